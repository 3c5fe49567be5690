//! No exit is lost: an [`Exit`] that escapes the service (no boundary, or a
//! layer that raised it again above the boundary) becomes the server's exit.
//!
//! Without this, hyper would drop the connection of a request whose future
//! unwound (the client gets an empty reply, HTTP/2 a stream error) and the
//! server would serve on, the exit gone. Here the exit is logged at ERROR,
//! recorded in the supervisor (so the server drains and resolves to it) and
//! the request is answered `503` with `connection: close`, as a boundary
//! would.

use crate::boundary::ExitResponse;
use crate::exit::{enter_catching, leave};
use crate::{Exit, Supervisor};
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tower_service::Service;

use super::BoxError;

/// Wraps the service a server runs; see [the module docs](self).
#[derive(Clone, Debug)]
pub(crate) struct Escapes<S> {
    inner: S,
    supervisor: Supervisor,
}

impl<S> Escapes<S> {
    pub(crate) fn new(inner: S, supervisor: &Supervisor) -> Self {
        Escapes {
            inner,
            supervisor: supervisor.clone(),
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Escapes<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<EscapeBody<ResBody>>;
    type Error = BoxError;
    type Future = EscapesFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let version = req.version();
        let inner = &mut self.inner;
        let outer = enter_catching();
        let called = catch_unwind(AssertUnwindSafe(|| inner.call(req)));
        leave(outer);
        let state = match called {
            Ok(future) => State::Running { future },
            Err(payload) => match Exit::from_panic(&*payload) {
                Some(exit) => {
                    escaped(&self.supervisor, exit);
                    State::Exited
                }
                None => resume_unwind(payload),
            },
        };
        EscapesFuture {
            state,
            supervisor: self.supervisor.clone(),
            version,
        }
    }
}

pin_project! {
    pub(crate) struct EscapesFuture<F> {
        #[pin]
        state: State<F>,
        supervisor: Supervisor,
        version: Version,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] future: F },
        Exited,
    }
}

impl<F, B, E> Future for EscapesFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<EscapeBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let StateProj::Running { future } = this.state.project() {
            let outer = enter_catching();
            let polled = catch_unwind(AssertUnwindSafe(|| future.poll(cx)));
            leave(outer);
            match polled {
                Ok(poll) => match ready!(poll) {
                    Ok(mut res) => match res.extensions_mut().remove::<ExitResponse>() {
                        Some(ExitResponse(exit)) => escaped(this.supervisor, &exit),
                        None => return Poll::Ready(Ok(res.map(|body| EscapeBody::Inner { body }))),
                    },
                    Err(err) => {
                        let err: BoxError = err.into();
                        match Exit::from_error(&*err) {
                            Some(exit) => escaped(this.supervisor, exit),
                            None => return Poll::Ready(Err(err)),
                        }
                    }
                },
                Err(payload) => match Exit::from_panic(&*payload) {
                    Some(exit) => escaped(this.supervisor, exit),
                    None => resume_unwind(payload),
                },
            }
        }
        Poll::Ready(Ok(answer(*this.version)))
    }
}

#[cold]
fn escaped(supervisor: &Supervisor, exit: &Exit) {
    // An exit armed by a fork guard in a forked child ends that child here,
    // before the log line allocates: it must not answer the parent's client
    // nor stop the parent's server.
    #[cfg(all(unix, feature = "fork"))]
    crate::fork::end_if_armed(exit);
    tracing::error!(
        exit.code = exit.code(),
        exit.message = exit.message(),
        "exit escaped the service (no exit-aware boundary caught it): the server drains and ends with it"
    );
    supervisor.trigger(exit.clone());
}

/// `503`, and `connection: close` where HTTP/1 has it.
fn answer<B>(version: Version) -> Response<EscapeBody<B>> {
    let mut res = Response::new(EscapeBody::Empty);
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    if version <= Version::HTTP_11 {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

pin_project! {
    /// The service's body, or the empty body of the `503` answered for an
    /// escaped exit (empty, so any body type works).
    #[project = EscapeBodyProj]
    #[derive(Debug)]
    pub(crate) enum EscapeBody<B> {
        Inner { #[pin] body: B },
        Empty,
    }
}

impl<B: Body> Body for EscapeBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        match self.project() {
            EscapeBodyProj::Inner { body } => body.poll_frame(cx),
            EscapeBodyProj::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EscapeBody::Inner { body } => body.is_end_stream(),
            EscapeBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            EscapeBody::Inner { body } => body.size_hint(),
            EscapeBody::Empty => SizeHint::with_exact(0),
        }
    }
}
