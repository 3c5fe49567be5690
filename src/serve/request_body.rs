//! The request body under `serve::http`: hyper's `Incoming`, held to a
//! minimum rate while the application waits for it.

use super::listen::Peer;
use super::min_rate::{MinRate, ReadRate};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::Sleep;

pin_project! {
    /// The body of a request served by [`serve::http`](crate::serve::http()):
    /// hyper's [`Incoming`], with the minimum request body rate of
    /// [`ServeHttp::min_request_body_rate`](crate::serve::ServeHttp::min_request_body_rate)
    /// applied while the application waits for it.
    ///
    /// A client that sends slower than the rate gets its request ended: the
    /// application's next read fails with [`BodyError::TooSlow`] (axum's
    /// extractors answer `400`), logged at INFO, and the connection closes
    /// after the response (HTTP/1; HTTP/2: that stream). Time the
    /// application spends not reading does not count against the client.
    /// [`into_incoming`](Self::into_incoming) gives hyper's body back,
    /// without the rule.
    #[derive(Debug)]
    pub struct RequestBody {
        #[pin]
        inner: Incoming,
        rate: ReadRate,
        // While the application waits for bytes: the deadline the
        // allowance sets (allocated at the first wait only).
        deadline: Option<Pin<Box<Sleep>>>,
        peer: Peer,
    }
}

/// Why a [`RequestBody`] ended early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// hyper's error: the client closed the connection, a protocol error.
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// The client sends the body slower than the minimum request body rate.
    #[error("the client sends the request body slower than {bytes_per_sec} bytes a second")]
    TooSlow {
        /// The minimum rate.
        bytes_per_sec: u64,
    },
}

impl RequestBody {
    pub(crate) fn new(inner: Incoming, rate: Option<MinRate>, peer: Peer) -> Self {
        RequestBody {
            inner,
            rate: ReadRate::new(rate),
            deadline: None,
            peer,
        }
    }

    /// hyper's body, without the minimum rate.
    pub fn into_incoming(self) -> Incoming {
        self.inner
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        let Some(rate) = this.rate.rate() else {
            return polled.map(|frame| frame.map(|frame| frame.map_err(BodyError::from)));
        };
        if let Poll::Ready(frame) = polled {
            // The wait, if any, is over: spent from the allowance; the
            // bytes earn theirs back.
            let n = match &frame {
                Some(Ok(frame)) => frame.data_ref().map_or(0, Bytes::len),
                _ => 0,
            };
            this.rate.received(n);
            return Poll::Ready(frame.map(|frame| frame.map_err(BodyError::from)));
        }
        // The application waits for the client: for as long as the
        // allowance lasts.
        let at = this.rate.wait_deadline().expect("the rule is on");
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if deadline.deadline() != at {
            deadline.as_mut().reset(at);
        }
        if deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.rate.turn_off();
        tracing::info!(
            peer = %this.peer,
            min_bytes_per_sec = rate.bytes_per_sec,
            grace = ?rate.grace,
            "the client sends the request body slower than the minimum rate: request ended"
        );
        Poll::Ready(Some(Err(BodyError::TooSlow {
            bytes_per_sec: rate.bytes_per_sec,
        })))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
