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
//!   (see [`WriteRate`]).

use super::in_flight::Conn;
use super::listen::{Peer, Stream};
use super::min_rate::{MinRate, WriteRate};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

pub(crate) struct ConnIo {
    inner: Stream,
    conn: Arc<Conn>,
    /// Released when the socket is dropped, upgraded or not.
    _slot: OwnedSemaphorePermit,
    peer: Peer,
    rate: WriteRate,
}

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
            rate: WriteRate::new(min_rate),
        }
    }

    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        let polled = self.rate.polled(cx, polled, &self.peer);
        if let Poll::Ready(Ok(n)) = polled {
            self.conn.wrote(n);
        }
        polled
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
