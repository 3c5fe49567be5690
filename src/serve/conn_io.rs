//! An accepted HTTP connection's socket as the server hands it to hyper.
//!
//! - It holds the connection's slot under the cap until the socket is
//!   closed, not until hyper's connection task ends: an upgraded
//!   connection (a WebSocket) lives on in its handler, and counts against
//!   the cap, and keeps the drain waiting, until the handler drops it.
//! - It counts the bytes written, so that a response the client is still
//!   reading (hyper took the body's last frame, the socket has not taken
//!   it all yet) is activity, not an idle connection to close.
//! - It holds a client that reads too slowly to the minimum response rate
//!   (see [`MinRate`]).

use super::in_flight::Conn;
use super::listen::{Peer, Stream};
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

pub(crate) struct ConnIo {
    inner: Stream,
    conn: Arc<Conn>,
    /// Released when the socket is dropped, upgraded or not.
    _slot: OwnedSemaphorePermit,
    peer: Peer,
    min_rate: Option<MinRate>,
    /// Bytes the socket took since the last wait on the client began.
    earned: u64,
    /// While a write waits on the client: when the wait ends the connection.
    wait: Option<Pin<Box<Sleep>>>,
}

/// The minimum rate at which a client must take a response: a write that
/// waits on the client (the socket's buffer is full) may wait `grace`,
/// plus the time the bytes the client took since its previous wait are
/// worth at `bytes_per_sec` (at most [`EARNED_CAP`] of them); longer, and
/// the connection is closed. A client that reads steadily at the rate or
/// faster is never closed; one that stops reading is closed within
/// `grace + EARNED_CAP / bytes_per_sec`. Time the application spends
/// producing the response does not count: only waits on the socket do.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MinRate {
    pub(crate) bytes_per_sec: u64,
    pub(crate) grace: Duration,
}

/// The most bytes a client's reading earns toward its next wait: the
/// kernel frees a socket's send buffer in steps of up to about this size
/// (half the buffer), so a client reading at the rate waits that long
/// between two steps.
pub(crate) const EARNED_CAP: u64 = 64 << 10;

impl ConnIo {
    pub(crate) fn new(
        inner: Stream,
        conn: Arc<Conn>,
        slot: OwnedSemaphorePermit,
        peer: Peer,
        min_rate: Option<MinRate>,
    ) -> Self {
        ConnIo {
            inner,
            conn,
            _slot: slot,
            peer,
            min_rate: min_rate.filter(|rate| rate.bytes_per_sec > 0),
            earned: 0,
            wait: None,
        }
    }

    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                self.conn.wrote(n);
                self.wait = None;
                self.earned = self.earned.saturating_add(n as u64);
                polled
            }
            Poll::Pending => match self.min_rate {
                Some(rate) => self.waits(cx, rate),
                None => Poll::Pending,
            },
            Poll::Ready(Err(_)) => polled,
        }
    }

    /// A write waits on the client: pending within its allowance, an
    /// error once the allowance is spent (hyper then closes the
    /// connection).
    #[cold]
    fn waits(&mut self, cx: &mut Context<'_>, rate: MinRate) -> Poll<io::Result<usize>> {
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
            peer = %self.peer,
            min_bytes_per_sec = rate.bytes_per_sec,
            grace = ?rate.grace,
            "the client reads the response slower than the minimum rate: connection closed"
        );
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client reads slower than the minimum response rate",
        )))
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(cx, polled)
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
