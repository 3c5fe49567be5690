//! The response body of layers that may answer on their own.

use crate::catch::{catch_body, caught_in_body};
use crate::exit::Exit;
use crate::grpc::LastCall;
use crate::supervisor::Supervisor;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::panic::resume_unwind;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

pin_project! {
    /// Either the inner service's body, or a small body the layer wrote
    /// itself (the `500` of [`CatchPanicLayer`](crate::CatchPanicLayer), the
    /// `503` of [`BoundaryLayer`](crate::BoundaryLayer)).
    ///
    /// Not boxed: answering through these layers allocates nothing.
    ///
    /// Under the boundary (and [`Supervisor::stack`]) the inner body is
    /// polled under a catch: an [`Exit`] raised while it streams is
    /// recorded in the supervisor (the server drains and resolves with it),
    /// then unwinds on, which ends the response after the bytes already
    /// sent: the client sees a cut, never a complete-looking body. A gRPC
    /// call's body still streaming at the drain's last call ends between
    /// two messages with trailers `grpc-status: 14` (`UNAVAILABLE`).
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
            sink: Option<Sink>,
            // Off but for a gRPC call's, under a supervised layer.
            last_call: LastCall,
        },
        Full { data: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// `body` as the body these layers answer with: for a layer above them
    /// that answers on its own (a real error turned into a `500` above the
    /// stack).
    pub fn new(body: B) -> Self {
        ResponseBody::inner(body)
    }

    pub(crate) fn inner(body: B) -> Self {
        ResponseBody {
            kind: Kind::Inner {
                body,
                sink: None,
                last_call: LastCall::new(false),
            },
        }
    }

    /// The inner body, an exit raised in it taken by `sink`'s supervisor;
    /// a gRPC call's (`grpc`) ended at the drain's last call.
    #[inline]
    pub(crate) fn supervised(body: B, sink: Sink, grpc: bool) -> Self {
        ResponseBody {
            kind: Kind::Inner {
                body,
                sink: Some(sink),
                last_call: LastCall::new(grpc),
            },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

/// The inner body's default: so that layers needing `ResBody: Default`
/// (tower-http's `TimeoutLayer`) sit above the exit-aware ones.
impl<B: Default> Default for ResponseBody<B> {
    fn default() -> Self {
        ResponseBody::inner(B::default())
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner {
                body, sink: None, ..
            } => body.poll_frame(cx),
            KindProj::Inner {
                body,
                sink: Some(sink),
                last_call,
            } => match catch_body(|| {
                last_call.poll_frame(sink.supervisor(), cx, |cx| body.poll_frame(cx))
            }) {
                Ok(poll) => poll,
                Err(payload) => {
                    if let Some(exit) = Exit::from_panic(&*payload) {
                        caught_in_body(sink.supervisor(), exit);
                    }
                    resume_unwind(payload)
                }
            },
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { last_call, .. } if last_call.said() => true,
            Kind::Inner { body, .. } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// Who a supervised body hands an exit to: what the layer's response future
/// already held, moved into the body when the response is ready, so that a
/// plain response costs no reference count more.
pub(crate) enum Sink {
    /// The boundary's supervisor.
    Supervisor(Supervisor),
    /// The one-layer stack's shared state, which holds its supervisor.
    Shared(Arc<dyn HasSupervisor>),
}

impl Sink {
    fn supervisor(&self) -> &Supervisor {
        match self {
            Sink::Supervisor(supervisor) => supervisor,
            Sink::Shared(shared) => shared.supervisor(),
        }
    }
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Sink").field(self.supervisor()).finish()
    }
}

/// State that holds a supervisor (the stack's shared state).
pub(crate) trait HasSupervisor: Send + Sync + 'static {
    fn supervisor(&self) -> &Supervisor;
}
