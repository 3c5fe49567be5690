//! Carry an [`Exit`] around a layer you do not control.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use std::convert::Infallible;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_exit::{ServiceBuilderExt, Supervisor};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let supervisor = Supervisor::new();
//! let svc = ServiceBuilder::new()
//!     .boundary(&supervisor)
//!     // tower-http would answer the exit with a 500; tunneled, it never sees it.
//!     .tunnel(tower_http::catch_panic::CatchPanicLayer::new())
//!     .service_fn(|_: Request<()>| async {
//!         tower_exit::exit(4);
//!         Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
//!     });
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert_eq!(supervisor.exit().unwrap().code(), 4);
//! # }
//! ```
//!
//! tower-http's `CatchPanicLayer` answers an exit with a `500`, a reporter
//! files it as a crash, a retry policy runs the work again, a timeout fires
//! while it unwinds. [`TunnelLayer::new(foreign)`](TunnelLayer::new) wraps
//! such a layer so that it never sees the exit:
//!
//! ```text
//!   Tunnel            puts a slot into the request, polls the foreign future,
//!    └ foreign layer  and, once the slot is filled, drops it and re-raises
//!       └ Capture     catches the exit below the foreign layer, stores it in
//!          └ inner      the slot, wakes the tunnel, and stays pending forever
//! ```
//!
//! Above the tunnel the exit re-appears in the form it entered: an unwind
//! resumes with the same payload, an `Err` is returned as the same error
//! value (converted into the foreign service's error type when that is
//! `tower::BoxError`). Real failures go through the foreign layer exactly as
//! before.
//!
//! # Cost and limits
//!
//! Per request, the tunnel allocates its slot (one small `Arc`) and inserts
//! a handle to it into the request's extensions (for `http::Request`, which
//! boxes every extension, and allocates its map on the first insert).
//!
//! - The slot travels in the request. A foreign layer that builds a new
//!   request instead of passing the one it got loses it; below such a layer
//!   an exit travels on untunneled, as it would without the tunnel.
//! - If the foreign layer polls the inner future on another task (a layer
//!   that `tokio::spawn`s it), the tunnel still gets the exit (it is woken),
//!   but that task stays parked forever once the tunnel has dropped its
//!   side: it holds no inner future any more, only the emptied capture.
//! - Dropping the tunnel's response future early (the client went away)
//!   drops the foreign future with it; nothing is left behind.

use crate::exit::{catching, enter_catching, leave, AsError, ConcreteError};
use crate::Exit;
use atomic_waker::AtomicWaker;
use pin_project_lite::pin_project;
use std::any::Any;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

use crate::BoxError;

/// A request type that can carry a tunnel's slot past a foreign layer.
///
/// Implemented for `http::Request<B>` (in its extensions). Implement it for
/// your own request type by keeping an `Option<TunnelSlot>` in it: a stack
/// of slots if tunnels are nested, since each tunnel inserts one and each
/// capture takes the latest.
pub trait TunnelRequest {
    /// Stores the slot of the tunnel the request is entering.
    fn insert_tunnel(&mut self, slot: TunnelSlot);
    /// Takes back the slot of the innermost tunnel the request entered.
    fn take_tunnel(&mut self) -> Option<TunnelSlot>;
}

/// The extension `http::Request` carries: the slot of the innermost tunnel
/// the request is inside, over those of the tunnels around it (boxed only
/// when tunnels are nested).
#[derive(Clone)]
struct SlotStack {
    top: TunnelSlot,
    below: Option<Box<SlotStack>>,
}

impl<B> TunnelRequest for http::Request<B> {
    fn insert_tunnel(&mut self, slot: TunnelSlot) {
        let extensions = self.extensions_mut();
        let below = extensions.remove::<SlotStack>().map(Box::new);
        extensions.insert(SlotStack { top: slot, below });
    }

    fn take_tunnel(&mut self) -> Option<TunnelSlot> {
        let extensions = self.extensions_mut();
        let stack = extensions.remove::<SlotStack>()?;
        if let Some(below) = stack.below {
            extensions.insert(*below);
        }
        Some(stack.top)
    }
}

/// What a capture found below the foreign layer.
enum Carried {
    Unwind(Box<dyn Any + Send>),
    Error {
        error: Box<dyn Any + Send>,
        into_box: fn(Box<dyn Any + Send>) -> BoxError,
    },
}

struct Shared {
    /// Set once `carried` holds the exit; read on every poll of the tunnel
    /// (an atomic load), so the mutex is only taken on the exit path.
    filled: AtomicBool,
    carried: Mutex<Option<Carried>>,
    tunnel: AtomicWaker,
}

/// The per-request meeting point of a tunnel and its capture. Opaque; see
/// [`TunnelRequest`].
#[derive(Clone)]
pub struct TunnelSlot(Arc<Shared>);

impl fmt::Debug for TunnelSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelSlot")
            .field("filled", &self.0.filled.load(Ordering::Acquire))
            .finish()
    }
}

impl TunnelSlot {
    fn new() -> Self {
        TunnelSlot(Arc::new(Shared {
            filled: AtomicBool::new(false),
            carried: Mutex::new(None),
            tunnel: AtomicWaker::new(),
        }))
    }

    /// Capture side. Wake-up order: store, then publish `filled`, then
    /// wake; the tunnel registers its waker *before* it checks `filled`, so
    /// either it sees the flag or it is woken after it registered.
    fn fill(&self, carried: Carried) {
        let mut slot = self.0.carried.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(carried);
        }
        drop(slot);
        self.0.filled.store(true, Ordering::Release);
        self.0.tunnel.wake();
    }

    /// Tunnel side: the exit, once a capture stored it.
    fn take(&self) -> Option<Carried> {
        if !self.0.filled.load(Ordering::Acquire) {
            return None;
        }
        self.0
            .carried
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// Wraps a foreign layer so that an [`Exit`] raised below it is carried
/// around it. See [the module docs](self).
///
/// `M` is the [`AsError`] marker of the inner service's error, always
/// inferred.
pub struct TunnelLayer<L, M = ConcreteError> {
    foreign: L,
    _error: PhantomData<fn() -> M>,
}

impl<L> TunnelLayer<L> {
    /// Tunnels exits around `foreign`.
    pub fn new<M>(foreign: L) -> TunnelLayer<L, M> {
        TunnelLayer {
            foreign,
            _error: PhantomData,
        }
    }
}

impl<L: Clone, M> Clone for TunnelLayer<L, M> {
    fn clone(&self) -> Self {
        TunnelLayer {
            foreign: self.foreign.clone(),
            _error: PhantomData,
        }
    }
}

impl<L: fmt::Debug, M> fmt::Debug for TunnelLayer<L, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TunnelLayer").field(&self.foreign).finish()
    }
}

impl<S, L, M> Layer<S> for TunnelLayer<L, M>
where
    L: Layer<Capture<S, M>>,
{
    type Service = Tunnel<L::Service>;

    fn layer(&self, inner: S) -> Self::Service {
        Tunnel::new(inner, &self.foreign)
    }
}

/// The outer side of a tunnel: the foreign service, wrapped. Built by
/// [`TunnelLayer`].
#[derive(Clone, Debug)]
pub struct Tunnel<T> {
    foreign: T,
}

impl<T> Tunnel<T> {
    /// Wraps `inner` in the `foreign` layer with a tunnel around it: what
    /// `TunnelLayer::new(foreign).layer(inner)` builds. `M` is the
    /// [`AsError`] marker of `inner`'s error.
    pub fn new<S, L, M>(inner: S, foreign: &L) -> Self
    where
        L: Layer<Capture<S, M>, Service = T>,
    {
        Tunnel {
            foreign: foreign.layer(Capture {
                inner,
                _error: PhantomData,
            }),
        }
    }
}

inner_accessors!(Tunnel<T>, foreign);

impl<T, Req> Service<Req> for Tunnel<T>
where
    T: Service<Req>,
    T::Error: 'static,
    Req: TunnelRequest,
{
    type Response = T::Response;
    type Error = T::Error;
    type Future = TunnelFuture<T::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.foreign.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let slot = TunnelSlot::new();
        req.insert_tunnel(slot.clone());
        TunnelFuture {
            foreign: Some(self.foreign.call(req)),
            slot,
        }
    }
}

pin_project! {
    /// Response future of [`Tunnel`].
    pub struct TunnelFuture<F> {
        #[pin]
        foreign: Option<F>,
        slot: TunnelSlot,
    }
}

impl<F, T, E> Future for TunnelFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: 'static,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // Register before polling and checking: see `TunnelSlot::fill`.
        this.slot.0.tunnel.register(cx.waker());
        let polled = match this.foreign.as_mut().as_pin_mut() {
            Some(foreign) => foreign.poll(cx),
            None => Poll::Pending,
        };
        // The exit wins over whatever the foreign future made of the
        // capture staying pending (a timeout firing, say): the foreign
        // layer must not observe it.
        match this.slot.take() {
            Some(carried) => {
                this.foreign.set(None);
                Poll::Ready(Err(resurface(carried)))
            }
            None => polled,
        }
    }
}

/// The exit in the form it entered the tunnel: an unwind resumes (this
/// function then does not return), an error becomes `E`.
fn resurface<E: 'static>(carried: Carried) -> E {
    let (error, into_box) = match carried {
        Carried::Unwind(payload) => resume_unwind(payload),
        Carried::Error { error, into_box } => (error, into_box),
    };
    // The same type on both sides of the foreign layer: the same value.
    let error = match error.downcast::<E>() {
        Ok(error) => return *error,
        Err(error) => error,
    };
    // The foreign service boxes errors (`tower::BoxError`): box it the same way.
    let mut boxed = Some(into_box(error));
    if let Some(error) = (&mut boxed as &mut dyn Any).downcast_mut::<Option<E>>() {
        return error.take().expect("just set");
    }
    // Any other error type cannot hold the exit: raise it as an unwind,
    // which every exit-aware layer above handles like the `Err`.
    let boxed = boxed.expect("not taken");
    match Exit::from_error(&*boxed) {
        Some(exit) => exit.clone().raise(),
        None => unreachable!("only exits are carried"),
    }
}

/// The inner side of a tunnel: sits below the foreign layer and catches
/// exits into the request's slot.
pub struct Capture<S, M = ConcreteError> {
    inner: S,
    _error: PhantomData<fn() -> M>,
}

impl<S: Clone, M> Clone for Capture<S, M> {
    fn clone(&self) -> Self {
        Capture {
            inner: self.inner.clone(),
            _error: PhantomData,
        }
    }
}

impl<S: fmt::Debug, M> fmt::Debug for Capture<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capture")
            .field("inner", &self.inner)
            .finish()
    }
}

impl<S, M, Req> Service<Req> for Capture<S, M>
where
    S: Service<Req>,
    S::Error: AsError<M> + Into<BoxError> + Send + 'static,
    Req: TunnelRequest,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CaptureFuture<S::Future, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let slot = req.take_tunnel();
        let inner = &mut self.inner;
        // With a slot, this capture catches exits: say so to `Exit::raise`,
        // also when a foreign layer polls us on another task.
        let tunneled = slot.is_some();
        match catch_unwind(AssertUnwindSafe(|| {
            if tunneled {
                catching(|| inner.call(req))
            } else {
                inner.call(req)
            }
        })) {
            Ok(future) => CaptureFuture {
                state: CaptureState::Running { future, slot },
                _error: PhantomData,
            },
            Err(payload) => match slot {
                Some(slot) if Exit::from_panic(&*payload).is_some() => {
                    slot.fill(Carried::Unwind(payload));
                    CaptureFuture {
                        state: CaptureState::Parked,
                        _error: PhantomData,
                    }
                }
                _ => resume_unwind(payload),
            },
        }
    }
}

pin_project! {
    /// Response future of [`Capture`].
    pub struct CaptureFuture<F, M> {
        #[pin]
        state: CaptureState<F>,
        _error: PhantomData<fn() -> M>,
    }
}

pin_project! {
    #[project = CaptureProj]
    enum CaptureState<F> {
        Running { #[pin] future: F, slot: Option<TunnelSlot> },
        // The exit is in the slot: pending forever, so the foreign layer
        // never sees an outcome. The tunnel drops us.
        Parked,
    }
}

fn into_box<E: Into<BoxError> + 'static>(error: Box<dyn Any + Send>) -> BoxError {
    match error.downcast::<E>() {
        Ok(error) => (*error).into(),
        Err(_) => unreachable!("stored as E by the capture"),
    }
}

impl<F, M, T, E> Future for CaptureFuture<F, M>
where
    F: Future<Output = Result<T, E>>,
    E: AsError<M> + Into<BoxError> + Send + 'static,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        let carried = match state.as_mut().project() {
            CaptureProj::Parked => return Poll::Pending,
            CaptureProj::Running { future, slot } => {
                if slot.is_none() {
                    // Not inside a tunnel (the request lost its slot): pass
                    // everything on.
                    return future.poll(cx);
                }
                let outer = enter_catching();
                let polled = catch_unwind(AssertUnwindSafe(|| future.poll(cx)));
                leave(outer);
                match polled {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(Err(error))) if Exit::from_service_error(&error).is_some() => {
                        Carried::Error {
                            error: Box::new(error),
                            into_box: into_box::<E>,
                        }
                    }
                    Ok(ready) => return ready,
                    Err(payload) if Exit::from_panic(&*payload).is_some() => {
                        Carried::Unwind(payload)
                    }
                    Err(payload) => resume_unwind(payload),
                }
            }
        };
        let slot = match state.as_mut().project() {
            CaptureProj::Running { slot, .. } => slot.take().expect("checked above"),
            CaptureProj::Parked => unreachable!("running until now"),
        };
        // Drop the inner future now: the exit's work is over.
        state.set(CaptureState::Parked);
        slot.fill(carried);
        Poll::Pending
    }
}
