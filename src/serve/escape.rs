//! No exit is lost: an [`Exit`] that escapes the service (no boundary, or a
//! layer that raised it again above the boundary) becomes the server's exit.
//!
//! Without this, hyper would drop the connection of a request whose future
//! unwound (the client gets an empty reply, HTTP/2 a stream error) and the
//! server would serve on, the exit gone. Here the exit is logged at ERROR,
//! recorded in the supervisor (so the server drains and resolves to it) and
//! the request is answered `503` with `connection: close` (a gRPC call:
//! `grpc-status: 14`), as a boundary would.
//!
//! The same wrapper counts the connection's requests in flight (see
//! `in_flight`): one wrapper, one future and one body per request.

use crate::catch::{catch_body, caught_in_body, classify, escaped, Polled};
use crate::exit::{enter_catching, enter_catching_in_call, leave, leave_call};
use crate::grpc::{Grpc, LastCall, SHUTTING_DOWN, UNAVAILABLE};
use crate::{Exit, Supervisor};
#[cfg(feature = "http")]
use futures_util::future::Either;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
#[cfg(feature = "http")]
use std::cell::RefCell;
use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
#[cfg(feature = "http")]
use std::task::Waker;
use std::task::{ready, Context, Poll};
#[cfg(feature = "http")]
use tower::util::Oneshot;
use tower_service::Service;

use super::budget::Budget;
use super::in_flight::{Conn, InFlight};
#[cfg(feature = "http")]
use super::listen::Peer;
#[cfg(feature = "http")]
use super::min_rate::MinRate;
#[cfg(feature = "http")]
use super::request_body::RequestBody;
use super::BoxError;
#[cfg(feature = "http")]
use hyper::body::Incoming;

/// Wraps the service a server runs; see [the module docs](self).
///
/// A tower service (FastCGI calls it so) and a hyper service (HTTP: no
/// adapter, and no clone of this wrapper per request, only of `inner`).
#[derive(Clone, Debug)]
pub(crate) struct Escapes<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S> Escapes<S> {
    /// Wraps `inner` for one connection; `draining` is the server's flag
    /// for HTTP/1's `connection: close`, if it has one; `budget` the
    /// server's request budget, of which the connection holds one unit as
    /// the credit for its first request.
    pub(crate) fn new(
        inner: S,
        supervisor: &Supervisor,
        draining: Option<&Arc<AtomicBool>>,
        budget: Option<&Arc<Budget>>,
    ) -> Self {
        Escapes {
            inner,
            conn: Arc::new(Conn::new(supervisor, draining, budget)),
        }
    }

    /// What this connection's requests did so far.
    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Counts a new request in flight; `Err` if it is beyond the budget
    /// (to be answered `503` without calling the service).
    fn start(&self, version: Version) -> Result<InFlight, InFlight> {
        InFlight::start(&self.conn, version)
    }
}

/// [`Escapes`] as hyper calls it, through `&self`, for one HTTP connection.
///
/// A service ready at once (a `Router`, a `service_fn`, the exit-aware
/// stack over them: nearly always) is called in place, with no clone of it
/// per request; otherwise it is polled until ready in the response future
/// and a clone takes its place (hyper-util's `TowerToHyperService` clones
/// for every request). Not `Sync`: hyper calls it from the
/// connection's task only, so the `RefCell` is never contended.
///
/// Every request gets the connection's [`Peer`] in its extensions (and,
/// feature `axum`, axum's `ConnectInfo<SocketAddr>` for a TCP peer).
#[cfg(feature = "http")]
#[derive(Debug)]
pub(crate) struct ForHyper<S> {
    escapes: RefCell<Escapes<S>>,
    peer: Peer,
    body_rate: Option<MinRate>,
}

#[cfg(feature = "http")]
impl<S> ForHyper<S> {
    pub(crate) fn new(escapes: Escapes<S>, peer: Peer, body_rate: Option<MinRate>) -> Self {
        ForHyper {
            escapes: RefCell::new(escapes),
            peer,
            body_rate,
        }
    }
}

#[cfg(feature = "http")]
impl<S, ResBody> hyper::service::Service<Request<Incoming>> for ForHyper<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<EscapeBody<ResBody>>;
    type Error = BoxError;
    type Future = EscapesFuture<Either<S::Future, Oneshot<S, Request<RequestBody>>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let mut req = req.map(|body| RequestBody::new(body, self.body_rate, self.peer));
        self.peer.insert_into(req.extensions_mut());
        // Never fails: hyper does not call again before `call` returns.
        let Ok(mut escapes) = self.escapes.try_borrow_mut() else {
            unreachable!("hyper calls its service from one task, never re-entrantly")
        };
        let escapes = &mut *escapes;
        let inner = &mut escapes.inner;
        let outer = enter_catching_in_call();
        let ready = catch_unwind(AssertUnwindSafe(|| {
            inner.poll_ready(&mut Context::from_waker(Waker::noop()))
        }));
        leave_call(outer);
        match ready {
            // Ready now: called in place.
            Ok(Poll::Ready(Ok(()))) => escapes.call_wrapped(req, Either::Left),
            // Not ready, or failing: this very service goes into the future,
            // to be polled until ready (or to say its error) with the
            // task's waker, and a clone takes its place. Not the other way
            // round: a `poll_ready` that returned `Pending` may hold a place
            // in a queue (a semaphore's, `ConcurrencyLimit`), and a clone
            // would wait behind it forever.
            Ok(Poll::Pending | Poll::Ready(Err(_))) => {
                let asked = Asked::of(&req);
                let in_flight = match escapes.start(asked.version) {
                    Ok(in_flight) => in_flight,
                    Err(in_flight) => return EscapesFuture::refused(asked, in_flight),
                };
                let clone = escapes.inner.clone();
                let pending = std::mem::replace(&mut escapes.inner, clone);
                EscapesFuture {
                    in_flight: Some(in_flight),
                    state: State::Running {
                        future: Either::Right(Oneshot::new(pending, req)),
                    },
                    asked,
                }
            }
            Err(payload) => escapes.unwound(Asked::of(&req), payload),
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
        self.call_wrapped(req, |future| future)
    }
}

impl<S> Escapes<S> {
    /// Calls the inner service (ready) under the catch; its future wrapped
    /// by `wrap`.
    fn call_wrapped<ReqBody, ResBody, F>(
        &mut self,
        req: Request<ReqBody>,
        wrap: impl FnOnce(S::Future) -> F,
    ) -> EscapesFuture<F>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    {
        let asked = Asked::of(&req);
        let in_flight = match self.start(asked.version) {
            Ok(in_flight) => in_flight,
            Err(in_flight) => return EscapesFuture::refused(asked, in_flight),
        };
        let inner = &mut self.inner;
        let outer = enter_catching_in_call();
        let called = catch_unwind(AssertUnwindSafe(|| inner.call(req)));
        leave_call(outer);
        match called {
            Ok(future) => EscapesFuture {
                state: State::Running {
                    future: wrap(future),
                },
                asked,
                in_flight: Some(in_flight),
            },
            Err(payload) => self.unwound(asked, payload),
        }
    }

    /// An unwind out of the inner service's `poll_ready` or `call`: an exit
    /// is answered (see [`escaped`]), a panic goes on.
    #[cold]
    fn unwound<F>(&self, asked: Asked, payload: Box<dyn std::any::Any + Send>) -> EscapesFuture<F> {
        match Exit::from_panic(&*payload) {
            Some(exit) => {
                let in_flight = InFlight::unbudgeted(&self.conn);
                escaped(in_flight.supervisor(), exit);
                EscapesFuture {
                    state: State::Exited { exit: exit.clone() },
                    asked,
                    in_flight: Some(in_flight),
                }
            }
            None => resume_unwind(payload),
        }
    }
}

/// What the server keeps of a request, to answer it on its own.
#[derive(Clone, Copy, Debug)]
struct Asked {
    version: Version,
    grpc: Option<Grpc>,
}

impl Asked {
    #[inline(always)]
    fn of<B>(req: &Request<B>) -> Self {
        Asked {
            version: req.version(),
            grpc: Grpc::of(req),
        }
    }
}

pin_project! {
    pub(crate) struct EscapesFuture<F> {
        #[pin]
        state: State<F>,
        asked: Asked,
        // Taken into the response body; `None` once the future completed.
        in_flight: Option<InFlight>,
    }
}

impl<F> EscapesFuture<F> {
    /// A request beyond the server's budget, without calling the service:
    /// an HTTP/2 stream is refused (`RST_STREAM REFUSED_STREAM`: never
    /// processed, which clients retry on another connection, as after
    /// GOAWAY), anything else gets `503` and its connection closed.
    fn refused(asked: Asked, in_flight: InFlight) -> Self {
        EscapesFuture {
            state: State::Refused,
            asked,
            in_flight: Some(in_flight),
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] future: F },
        Exited { exit: Exit },
        Refused,
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
        let supervisor = this
            .in_flight
            .as_ref()
            .expect("EscapesFuture polled after completion")
            .supervisor();
        let state = this.state.project();
        let asked = *this.asked;
        #[cfg(feature = "http")]
        if matches!(state, StateProj::Refused) && asked.version == Version::HTTP_2 {
            this.in_flight.take();
            return Poll::Ready(Err(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM))));
        }
        let exit = match state {
            StateProj::Running { future } => {
                let outer = enter_catching();
                let polled = catch_unwind(AssertUnwindSafe(|| {
                    future
                        .poll(cx)
                        .map(|result| result.map_err(Into::<BoxError>::into))
                }));
                leave(outer);
                match ready!(classify(polled, |err| Exit::from_error(&**err))) {
                    Polled::Response(mut res) => {
                        let in_flight = this.in_flight.take();
                        if in_flight
                            .as_ref()
                            .is_some_and(|in_flight| in_flight.closes_after(asked.version))
                        {
                            close(&mut res);
                        }
                        return Poll::Ready(Ok(res.map(|body| EscapeBody {
                            kind: Kind::Inner {
                                body,
                                last_call: LastCall::new(asked.grpc.is_some()),
                            },
                            in_flight,
                        })));
                    }
                    Polled::Error(err) => return Poll::Ready(Err(err)),
                    Polled::Exit(exit) => {
                        escaped(supervisor, &exit);
                        Some(exit)
                    }
                }
            }
            StateProj::Exited { exit } => Some(exit.clone()),
            StateProj::Refused => None,
        };
        Poll::Ready(Ok(answer(asked, exit, this.in_flight.take())))
    }
}

fn close<B>(res: &mut Response<B>) {
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// `503`, and `connection: close` where HTTP/1 has it; a gRPC call's
/// `UNAVAILABLE` (naming the `exit`, or the server's going away for a
/// request refused past its budget).
fn answer<B>(
    asked: Asked,
    exit: Option<Exit>,
    in_flight: Option<InFlight>,
) -> Response<EscapeBody<B>> {
    let body = EscapeBody {
        kind: Kind::Empty,
        in_flight,
    };
    let mut res = match (asked.grpc, exit) {
        (Some(grpc), Some(exit)) => return grpc.exit(body, asked.version, exit),
        // Refused past the budget: no exit happened, none is carried.
        (Some(grpc), None) => grpc.status(body, UNAVAILABLE, SHUTTING_DOWN),
        (None, _) => {
            let mut res = Response::new(body);
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            res
        }
    };
    if asked.version <= Version::HTTP_11 {
        close(&mut res);
    }
    res
}

pin_project! {
    /// The service's body, or the empty body of the `503` answered for an
    /// escaped exit (empty, so any body type works); holds its request's
    /// place in flight until hyper drops it.
    ///
    /// The body is polled under the catch: an exit raised in it, or
    /// returned as its error (anywhere in the chain), is taken by the
    /// server (recorded, the server drains) and ends the response with an
    /// error after the bytes already sent: hyper closes an HTTP/1
    /// connection and resets an HTTP/2 stream, the others go on.
    #[derive(Debug)]
    pub(crate) struct EscapeBody<B> {
        #[pin]
        kind: Kind<B>,
        in_flight: Option<InFlight>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
            // Off but for a gRPC call's: ended at the drain's last call.
            last_call: LastCall,
        },
        Empty,
    }
}

impl<B> Body for EscapeBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = self.project();
        let (body, last_call) = match this.kind.project() {
            KindProj::Inner { body, last_call } => (body, last_call),
            KindProj::Empty => return Poll::Ready(None),
        };
        let supervisor = this.in_flight.as_ref().map(InFlight::supervisor);
        let exit = match catch_body(|| match supervisor {
            Some(supervisor) => last_call.poll_frame(supervisor, cx, |cx| body.poll_frame(cx)),
            None => body.poll_frame(cx),
        }) {
            Ok(Poll::Ready(Some(Err(err)))) => {
                let err: BoxError = err.into();
                match Exit::from_error(&*err) {
                    Some(exit) => exit.clone(),
                    None => return Poll::Ready(Some(Err(err))),
                }
            }
            Ok(poll) => return poll.map(|frame| frame.map(|frame| frame.map_err(Into::into))),
            Err(payload) => match Exit::from_panic(&*payload) {
                Some(exit) => exit.clone(),
                None => resume_unwind(payload),
            },
        };
        if let Some(in_flight) = this.in_flight {
            caught_in_body(in_flight.supervisor(), &exit);
        }
        Poll::Ready(Some(Err(Box::new(exit))))
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { last_call, .. } if last_call.said() => true,
            Kind::Inner { body, .. } => body.is_end_stream(),
            Kind::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Empty => SizeHint::with_exact(0),
        }
    }
}
