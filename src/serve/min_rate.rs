//! Minimum data rates: the slowest a peer may take a response, or send a
//! request's body, after a grace. One rule for both servers' writes
//! ([`WriteRate`]); the request side is `request_body` (HTTP) and the
//! FastCGI connection's input rate.

use std::fmt::Display;
use std::future::Future;
use std::io;
#[cfg(feature = "fastcgi")]
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
#[cfg(feature = "fastcgi")]
use tokio::io::AsyncWrite;
use tokio::time::Sleep;

/// A minimum rate: `bytes_per_sec` after `grace` (0: off).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MinRate {
    pub(crate) bytes_per_sec: u64,
    pub(crate) grace: Duration,
}

/// The most bytes a peer's progress earns toward its next wait: the
/// kernel frees a socket's send buffer in steps of up to about this size
/// (half the buffer), so a client reading at the rate waits that long
/// between two steps.
pub(crate) const EARNED_CAP: u64 = 64 << 10;

/// The minimum rate at which a peer must send what a reader waits for (a
/// request's body, a FastCGI request's input): the peer has an allowance,
/// `grace` to start with, spent while the reader waits for it and earned
/// back by each byte it sends (`1 / bytes_per_sec` a byte), up to
/// [`ReadRate::cap`]. Spent, the read fails. Time the reader spends not
/// waiting (the application not reading) does not count.
#[derive(Debug)]
pub(crate) struct ReadRate {
    rate: Option<MinRate>,
    /// What the peer may still make the reader wait.
    allowance: Duration,
    /// Since when the reader waits for the peer, if it does.
    waiting_since: Option<tokio::time::Instant>,
}

impl ReadRate {
    pub(crate) fn new(rate: Option<MinRate>) -> Self {
        let rate = rate.filter(|rate| rate.bytes_per_sec > 0);
        ReadRate {
            rate,
            allowance: rate.map_or(Duration::ZERO, |rate| rate.grace),
            waiting_since: None,
        }
    }

    /// The rule, unless it is off (a rate of 0, or turned off).
    #[cfg(feature = "http")]
    pub(crate) fn rate(&self) -> Option<MinRate> {
        self.rate
    }

    /// Turns the rule off (once it cut the peer).
    #[cfg(feature = "http")]
    pub(crate) fn turn_off(&mut self) {
        self.rate = None;
    }

    /// The most the allowance grows to: the grace, and what [`EARNED_CAP`]
    /// bytes are worth at the rate. A peer that stops sending altogether
    /// is cut within that much (4.6 min at 240 bytes a second after 5 s,
    /// after 64 KiB or more; `grace` after less).
    fn cap(rate: MinRate) -> Duration {
        rate.grace + Duration::from_secs_f64(EARNED_CAP as f64 / rate.bytes_per_sec as f64)
    }

    /// The reader waits for the peer (from now, or since its wait began):
    /// when the allowance runs out; `None` when the rule is off.
    pub(crate) fn wait_deadline(&mut self) -> Option<tokio::time::Instant> {
        self.rate?;
        let since = *self
            .waiting_since
            .get_or_insert_with(tokio::time::Instant::now);
        Some(since + self.allowance)
    }

    /// The wait, if any, ended with `n` bytes: it is spent from the
    /// allowance, and the bytes earn theirs back.
    pub(crate) fn received(&mut self, n: usize) {
        let Some(rate) = self.rate else {
            return;
        };
        if let Some(since) = self.waiting_since.take() {
            self.allowance = self.allowance.saturating_sub(since.elapsed());
        }
        let earned = Duration::from_secs_f64(n as f64 / rate.bytes_per_sec as f64);
        self.allowance = (self.allowance + earned).min(Self::cap(rate));
    }

    /// Nothing waits for the peer now: the next wait starts afresh, with
    /// the grace.
    #[cfg(feature = "fastcgi")]
    pub(crate) fn reset(&mut self) {
        if let Some(rate) = self.rate {
            self.allowance = rate.grace;
        }
        self.waiting_since = None;
    }
}

/// The minimum rate at which a peer must take what is written to it: a
/// write that waits on the peer (the socket's buffer is full) may wait
/// `grace`, plus the time the bytes the peer took since its previous wait
/// are worth at `bytes_per_sec` (at most [`EARNED_CAP`] of them); longer,
/// and the write fails (`TimedOut`), which closes the connection. A peer
/// that reads steadily at the rate or faster is never cut; one that stops
/// reading is cut within `grace + EARNED_CAP / bytes_per_sec`. Time the
/// application spends producing what is written does not count: only
/// waits on the socket do.
#[derive(Debug)]
pub(crate) struct WriteRate {
    rate: Option<MinRate>,
    /// Bytes the socket took since the last wait on the peer began.
    earned: u64,
    /// While a write waits on the peer: when the wait ends the connection.
    wait: Option<Pin<Box<Sleep>>>,
}

impl WriteRate {
    pub(crate) fn new(rate: Option<MinRate>) -> Self {
        WriteRate {
            rate: rate.filter(|rate| rate.bytes_per_sec > 0),
            earned: 0,
            wait: None,
        }
    }

    /// What a write's poll came to, under the rule (`peer` names the peer
    /// in the log line when it is cut).
    #[inline]
    pub(crate) fn polled(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
        peer: &dyn Display,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                self.wait = None;
                self.earned = self.earned.saturating_add(n as u64);
                polled
            }
            Poll::Pending => match self.rate {
                Some(rate) => self.waits(cx, rate, peer),
                None => Poll::Pending,
            },
            Poll::Ready(Err(_)) => polled,
        }
    }

    /// A write waits on the peer: pending within its allowance, an error
    /// once the allowance is spent.
    #[cold]
    fn waits(
        &mut self,
        cx: &mut Context<'_>,
        rate: MinRate,
        peer: &dyn Display,
    ) -> Poll<io::Result<usize>> {
        if self.wait.is_none() {
            let earned = self.earned.min(EARNED_CAP) as f64 / rate.bytes_per_sec as f64;
            self.earned = 0;
            let allowed = rate.grace + Duration::from_secs_f64(earned);
            self.wait = Some(Box::pin(tokio::time::sleep(allowed)));
        }
        let wait = self.wait.as_mut().expect("set above");
        ready!(wait.as_mut().poll(cx));
        self.wait = None;
        tracing::info!(
            %peer,
            min_bytes_per_sec = rate.bytes_per_sec,
            grace = ?rate.grace,
            "the peer reads the response slower than the minimum rate: connection closed"
        );
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer reads slower than the minimum response rate",
        )))
    }
}

/// A writer held to a [`WriteRate`] (the FastCGI connection's).
#[cfg(feature = "fastcgi")]
pub(crate) struct RateWriter<W> {
    inner: W,
    rate: WriteRate,
    peer: super::Peer,
}

#[cfg(feature = "fastcgi")]
impl<W> RateWriter<W> {
    pub(crate) fn new(inner: W, rate: Option<MinRate>, peer: super::Peer) -> Self {
        RateWriter {
            inner,
            rate: WriteRate::new(rate),
            peer,
        }
    }
}

#[cfg(feature = "fastcgi")]
impl<W: AsyncWrite + Unpin> AsyncWrite for RateWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.rate.polled(cx, polled, &this.peer)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.rate.polled(cx, polled, &this.peer)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
