//! What a connection's requests did, counted without a timer per request:
//! how many started and ended, and the bytes written (for the connection's
//! deadline in `serve::http`), whether it speaks HTTP/2, whether a response
//! must close it (the server drains, or its budget is spent), and the
//! supervisor an exit it carries goes to. With the server's open
//! connections ([`Open`]), for closing an idle one at the cap.

use super::budget::{Budget, Credit};
use crate::supervisor::Supervisor;
use http::Version;
#[cfg(feature = "http")]
use std::collections::HashMap;
#[cfg(feature = "http")]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
#[cfg(feature = "http")]
use std::sync::{Mutex, PoisonError};
#[cfg(feature = "http")]
use std::time::{Duration, Instant};
#[cfg(feature = "http")]
use tokio::sync::Notify;

/// One connection's count of its requests.
///
/// Invariant: `ended` never passes `started`; they differ exactly while a
/// request is in flight, so the connection is busy. Relaxed atomics: the
/// task only compares the counts on its own timer, and a late view delays
/// the check by one period at most.
///
/// A request ends when hyper drops its response body, which it does once it
/// took the last frame, before the socket took the bytes; `written` (the
/// bytes the socket took, see `conn_io`) covers the rest: a response still
/// going out is activity too.
#[derive(Debug)]
pub(crate) struct Conn {
    supervisor: Supervisor,
    started: AtomicU32,
    ended: AtomicU32,
    #[cfg(feature = "http")]
    written: AtomicU64,
    /// When the last request ended, in nanoseconds after `accepted` (0:
    /// none yet): how long the connection has been idle, for the cap.
    #[cfg(feature = "http")]
    last_end: AtomicU64,
    #[cfg(feature = "http")]
    accepted: Instant,
    /// Asks the connection's task to shut it down gracefully: idle at the
    /// cap, or HTTP/2 while the server goes away or past its budget.
    #[cfg(feature = "http")]
    reclaim: Notify,
    #[cfg(feature = "http")]
    reclaimed: AtomicBool,
    http2: AtomicBool,
    /// No credit is left for the connection's next request: it must close
    /// after this one (FastCGI closes it itself after `END_REQUEST`; nginx
    /// keeps a FastCGI connection whatever the response's headers say).
    closing: AtomicBool,
    /// Server-wide: set once the server goes away (its shutdown delay or
    /// drain). `serve::http` only: its presence tells an HTTP connection
    /// (see [`Conn::serves_http`]).
    draining: Option<Arc<AtomicBool>>,
    /// The connection's hold on the server's request budget, if any.
    credit: Option<Credit>,
}

impl Conn {
    /// A new connection's count; `draining` is the server's flag for
    /// HTTP/1's `connection: close`, if it has one; `budget` the server's
    /// request budget, of which the connection holds one unit as the
    /// credit for its first request.
    pub(crate) fn new(
        supervisor: &Supervisor,
        draining: Option<&Arc<AtomicBool>>,
        budget: Option<&Arc<Budget>>,
    ) -> Self {
        Conn {
            supervisor: supervisor.clone(),
            started: AtomicU32::new(0),
            ended: AtomicU32::new(0),
            #[cfg(feature = "http")]
            written: AtomicU64::new(0),
            #[cfg(feature = "http")]
            last_end: AtomicU64::new(0),
            #[cfg(feature = "http")]
            accepted: Instant::now(),
            #[cfg(feature = "http")]
            reclaim: Notify::new(),
            #[cfg(feature = "http")]
            reclaimed: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            draining: draining.cloned(),
            credit: budget.map(Credit::new),
        }
    }

    /// Whether the connection holds a unit of the budget for its next
    /// request (its first, or one renewed after a response).
    pub(crate) fn holds_credit(&self) -> bool {
        self.credit.as_ref().is_some_and(Credit::held)
    }

    /// Whether the connection holds a unit of the budget while the server
    /// has none left to accept a new connection with (open connections
    /// hold every unit not used): an idle one should give its unit back.
    #[cfg(feature = "fastcgi")]
    pub(crate) fn holds_a_needed_unit(&self) -> bool {
        self.credit
            .as_ref()
            .is_some_and(|credit| credit.held() && credit.budget().starved())
    }

    /// Whether this is a `serve::http` connection (the one server with a
    /// `draining` flag), not a FastCGI one.
    fn serves_http(&self) -> bool {
        self.draining.is_some()
    }

    /// What the connection did so far.
    #[cfg(feature = "http")]
    pub(crate) fn activity(&self) -> Activity {
        // `ended` first: read the other way round, a request starting and
        // ending between the two loads would show as ended but never started.
        let ended = self.ended.load(Ordering::Relaxed);
        Activity {
            started: self.started.load(Ordering::Relaxed),
            ended,
            written: self.written.load(Ordering::Relaxed),
        }
    }

    /// The socket took `n` more bytes.
    #[cfg(feature = "http")]
    pub(crate) fn wrote(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Whether the server goes away: it drains, or its shutdown delay
    /// runs.
    #[cfg(feature = "http")]
    fn going_away(&self) -> bool {
        self.draining
            .as_ref()
            .is_some_and(|draining| draining.load(Ordering::Acquire))
    }

    /// Asks the connection's task to shut it down gracefully, once.
    #[cfg(feature = "http")]
    fn close_gracefully(&self) {
        if !self.reclaimed.swap(true, Ordering::Relaxed) {
            self.reclaim.notify_one();
        }
    }

    /// Resolves once the server asks to close this connection gracefully
    /// (see [`Open::reclaim_idlest`], [`Open::go_away_http2`]).
    #[cfg(feature = "http")]
    pub(crate) fn reclaimed(&self) -> tokio::sync::futures::Notified<'_> {
        self.reclaim.notified()
    }

    /// Whether the connection must close once its requests are done: its
    /// budget is spent (see [`InFlight::closes_after`]).
    #[cfg(feature = "fastcgi")]
    pub(crate) fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    #[cfg(feature = "http")]
    pub(crate) fn http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }
}

/// A connection's counts at one moment; see [`Conn::activity`].
#[cfg(feature = "http")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Activity {
    pub(crate) started: u32,
    pub(crate) ended: u32,
    pub(crate) written: u64,
}

#[cfg(feature = "http")]
impl Activity {
    /// No request in flight.
    pub(crate) fn no_request(&self) -> bool {
        self.started == self.ended
    }
}

/// A request in flight on a [`Conn`]: counted as ended when dropped, with
/// the response body (or with the response future, if it never completes).
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Conn>);

impl InFlight {
    /// Counts a new request on `conn`; `Err` if it is beyond the budget
    /// (to be answered `503` without calling the service).
    pub(crate) fn start(conn: &Arc<Conn>, version: Version) -> Result<InFlight, InFlight> {
        conn.started.fetch_add(1, Ordering::Relaxed);
        if version == Version::HTTP_2 {
            conn.http2.store(true, Ordering::Relaxed);
            // A new HTTP/2 connection while the server goes away (a
            // shutdown delay): served, and told GOAWAY.
            #[cfg(feature = "http")]
            if conn.going_away() {
                conn.close_gracefully();
            }
        }
        let in_flight = InFlight(conn.clone());
        match &conn.credit {
            Some(credit) if !credit.start_request() => {
                // Past the budget on HTTP/2: the stream is refused, and the
                // connection told GOAWAY so its client opens no more.
                #[cfg(feature = "http")]
                if version == Version::HTTP_2 {
                    conn.close_gracefully();
                }
                Err(in_flight)
            }
            _ => Ok(in_flight),
        }
    }

    /// A request counted without the budget: the answer to an exit that
    /// escaped `call`.
    pub(crate) fn unbudgeted(conn: &Arc<Conn>) -> InFlight {
        InFlight(conn.clone())
    }

    pub(crate) fn supervisor(&self) -> &Supervisor {
        &self.0.supervisor
    }

    /// Whether this HTTP/1 response must close its connection, so that
    /// keep-alive clients stop sending on it: the server drains, or (with
    /// a budget) no credit is left for the connection's next request.
    pub(crate) fn closes_after(&self, version: Version) -> bool {
        let conn = &self.0;
        // HTTP/2 streams take their units themselves, and its connections
        // are not closed by a header. (FastCGI renews for any HTTP version
        // its web server speaks: it closes its connection itself, see
        // `closing`.)
        if version > Version::HTTP_11 && conn.serves_http() {
            return false;
        }
        if conn
            .draining
            .as_ref()
            .is_some_and(|draining| draining.load(Ordering::Acquire))
        {
            return true;
        }
        let spent = conn.credit.as_ref().is_some_and(|credit| !credit.renew());
        if spent {
            conn.closing.store(true, Ordering::Release);
        }
        spent
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // HTTP picks its idlest connection by this; FastCGI has no use for
        // the clock read.
        #[cfg(feature = "http")]
        if self.0.serves_http() {
            // Nanoseconds fit in a u64 for 584 years of one connection.
            let since = self.0.accepted.elapsed().as_nanos() as u64;
            self.0.last_end.store(since.max(1), Ordering::Relaxed);
        }
        self.0.ended.fetch_add(1, Ordering::Relaxed);
        // A prefork worker's `max_rss`, checked as each request ends.
        #[cfg(feature = "prefork")]
        super::prefork::check_memory(&self.0.supervisor);
    }
}

/// How long a keep-alive connection must have been idle before it is
/// closed to make room: at the cap, or for a unit of the budget.
pub(crate) const RECLAIM_MIN_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a connection must have been silent since it was accepted
/// (no request) before it is closed to free its unit of the budget for a
/// client waiting in the backlog. A real client sends its request as soon
/// as it connected: its request arrives half a round trip after the
/// accept, so this leaves room for round trips up to 500 ms.
pub(crate) const SILENT_MIN: std::time::Duration = std::time::Duration::from_millis(250);

/// A server's open connections (HTTP), for making room at the cap: the
/// one idle the longest is asked to close, as nginx reuses its idle
/// keep-alive connections first when it runs short.
#[cfg(feature = "http")]
#[derive(Debug, Default)]
pub(crate) struct Open {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
}

#[cfg(feature = "http")]
impl Open {
    /// Counts `conn` as open until the returned entry is dropped.
    pub(crate) fn add(self: &Arc<Self>, conn: &Arc<Conn>) -> OpenEntry {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, conn.clone());
        OpenEntry {
            open: self.clone(),
            id,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks the keep-alive connection (a request done, none in flight, for
    /// at least [`RECLAIM_MIN_IDLE`]) idle the longest to close (its task
    /// shuts it down gracefully: a request its client sent meanwhile is
    /// still answered). False if there is none. With `holding_credit`,
    /// only a connection that holds a unit of the budget for its next
    /// request.
    pub(crate) fn reclaim_idlest(&self, holding_credit: bool) -> bool {
        let conns = self.lock();
        let now = Instant::now();
        let idlest = conns
            .values()
            .filter(|conn| {
                // Kept alive after a request: never one that has not sent
                // its first (its request may be on its way; the header
                // timeout bounds a silent one).
                let activity = conn.activity();
                activity.started > 0
                    && activity.no_request()
                    && !conn.reclaimed.load(Ordering::Relaxed)
                    && (!holding_credit || conn.holds_credit())
            })
            .map(|conn| {
                let idle_since =
                    conn.accepted + Duration::from_nanos(conn.last_end.load(Ordering::Relaxed));
                (idle_since, conn)
            })
            // A client that uses its connection now and then (a pool
            // between bursts) is not cut as it sends.
            .filter(|(idle_since, _)| {
                now.saturating_duration_since(*idle_since) >= RECLAIM_MIN_IDLE
            })
            .min_by_key(|(idle_since, _)| *idle_since)
            .map(|(_, conn)| conn);
        match idlest {
            Some(conn) => {
                conn.close_gracefully();
                true
            }
            None => false,
        }
    }

    /// Asks every connection that has sent no request since it was
    /// accepted at least [`SILENT_MIN`] ago to close: each holds a unit of
    /// the budget for its first request while clients wait for one. All at
    /// once: the backlog is served in order, so a real client may wait
    /// behind as many silent ones as there are units. How many were asked.
    pub(crate) fn reclaim_silent(&self) -> usize {
        let conns = self.lock();
        let mut asked = 0;
        for conn in conns.values().filter(|conn| {
            conn.activity().started == 0
                && conn.accepted.elapsed() >= SILENT_MIN
                && !conn.reclaimed.load(Ordering::Relaxed)
                && conn.holds_credit()
        }) {
            conn.close_gracefully();
            asked += 1;
        }
        asked
    }

    /// Tells every HTTP/2 connection GOAWAY (a shutdown delay starts); the
    /// requests in flight on them finish.
    pub(crate) fn go_away_http2(&self) {
        for conn in self.lock().values().filter(|conn| conn.http2()) {
            conn.close_gracefully();
        }
    }
}

/// A connection's place in [`Open`], given up when dropped.
#[cfg(feature = "http")]
#[derive(Debug)]
pub(crate) struct OpenEntry {
    open: Arc<Open>,
    id: u64,
}

#[cfg(feature = "http")]
impl Drop for OpenEntry {
    fn drop(&mut self) {
        self.open.lock().remove(&self.id);
    }
}
