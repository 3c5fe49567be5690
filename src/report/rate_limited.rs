//! [`RateLimited`]: a bound on reports during a failure storm.

use super::{Failure, Reporter};
use std::fmt;
use std::sync::Mutex;
use std::time::Instant;

/// How many reports a [`RateLimited`] reporter dropped, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Errors not reported.
    pub errors: u64,
    /// Panics not reported.
    pub panics: u64,
    /// Exits not reported (only those the exit policy reports at all).
    pub exits: u64,
}

impl Dropped {
    /// All reports dropped.
    pub fn total(&self) -> u64 {
        self.errors + self.panics + self.exits
    }

    fn count(&mut self, failure: &Failure<'_>) {
        match failure {
            Failure::Error(_) => self.errors += 1,
            Failure::Panic(_) => self.panics += 1,
            Failure::Exit(_) => self.exits += 1,
        }
    }
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limit: {} reports dropped ({} errors, {} panics, {} exits)",
            self.total(),
            self.errors,
            self.panics,
            self.exits
        )
    }
}

/// Wraps a [`Reporter`] so that a failure storm (10,000 panics in a second)
/// sends a bounded number of reports, plus one exact summary of what was
/// dropped.
///
/// A token bucket: up to `burst` reports at once, refilled at `per_second`.
/// A report that finds no token is counted, not queued: no unbounded memory,
/// and the request path never waits (the lock only guards a few
/// arithmetic operations; the wrapped reporter runs outside it). The
/// summary of drops goes to [`Reporter::report_dropped`] just before the
/// next report that is let through, or at [`flush`](Self::flush), or when
/// the `RateLimited` is dropped.
///
/// ```
/// use tower::{BoxError, ServiceBuilder};
/// use tower_exit::report::{RateLimited, TracingReporter};
/// use tower_exit::ReportLayer;
///
/// // At most 10 reports a second, 20 at once.
/// let svc = ServiceBuilder::new()
///     .layer(ReportLayer::new(RateLimited::new(TracingReporter, 10, 20)))
///     .service_fn(|_: ()| async { Ok::<_, BoxError>(()) });
/// # fn is_service<S: tower::Service<()>>(_: &S) {}
/// # is_service(&svc);
/// ```
pub struct RateLimited<R: Reporter> {
    inner: R,
    per_second: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
    dropped: Dropped,
}

impl<R: Reporter> RateLimited<R> {
    /// At most `burst` reports at once, refilled at `per_second` reports a
    /// second. `burst` is at least 1.
    pub fn new(inner: R, per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimited {
            inner,
            per_second: f64::from(per_second),
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                refilled: Instant::now(),
                dropped: Dropped::default(),
            }),
        }
    }

    /// The wrapped reporter.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Sends the summary of the reports dropped so far, if any, now.
    pub fn flush(&self) {
        let dropped = std::mem::take(&mut self.lock().dropped);
        if dropped.total() > 0 {
            self.inner.report_dropped(&dropped);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // Only arithmetic runs under the lock: a poisoned bucket is intact.
        self.bucket.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<R: Reporter> Reporter for RateLimited<R> {
    fn report(&self, failure: &Failure<'_>) {
        let summary = {
            let mut bucket = self.lock();
            let now = Instant::now();
            let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
            bucket.refilled = now;
            if bucket.tokens < 1.0 {
                bucket.dropped.count(failure);
                return;
            }
            bucket.tokens -= 1.0;
            std::mem::take(&mut bucket.dropped)
        };
        if summary.total() > 0 {
            self.inner.report_dropped(&summary);
        }
        self.inner.report(failure);
    }

    fn report_dropped(&self, dropped: &Dropped) {
        self.inner.report_dropped(dropped);
    }
}

impl<R: Reporter> Drop for RateLimited<R> {
    fn drop(&mut self) {
        self.flush();
    }
}

impl<R: Reporter + fmt::Debug> fmt::Debug for RateLimited<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimited")
            .field("inner", &self.inner)
            .field("per_second", &self.per_second)
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}
