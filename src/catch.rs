//! The one place that decides what an exit is and what happens to it:
//! finding it in what a service or a body gave (an unwind, an error and its
//! `source()` chain, an exit's own response), answering it, recording it in
//! the supervisor and saying it. The boundary, the one-layer stack, the
//! fork guard and the servers call these; none decides on its own.

use crate::body::ResponseBody;
use crate::exit::{enter_catching, leave, Exit};
use crate::grpc::Grpc;
use crate::supervisor::Supervisor;
use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::task::{ready, Poll};

/// What a poll of an inner future under `catch_unwind` came to, for a frame
/// that answers exits (the boundary, and a server for an exit that escaped
/// its service).
pub(crate) enum Polled<B, E> {
    /// A response to pass on.
    Response(Response<B>),
    /// An error that carries no exit, to pass on.
    Error(E),
    /// An exit: raised, returned as `Err` (anywhere in the error's chain,
    /// as `exit_in` finds it), or returned as a response (`IntoResponse for
    /// Exit`: the abort-safe channel).
    Exit(Exit),
}

/// Tells an exit apart from everything else in one caught poll; a real
/// panic unwinds on.
#[inline]
pub(crate) fn classify<B, E>(
    polled: std::thread::Result<Poll<Result<Response<B>, E>>>,
    exit_in: impl FnOnce(&E) -> Option<&Exit>,
) -> Poll<Polled<B, E>> {
    Poll::Ready(match polled {
        Ok(poll) => match ready!(poll) {
            Ok(mut res) => match take_exit_response(&mut res) {
                Some(exit) => Polled::Exit(exit),
                None => Polled::Response(res),
            },
            Err(err) => match exit_in(&err) {
                Some(exit) => Polled::Exit(exit.clone()),
                None => Polled::Error(err),
            },
        },
        Err(payload) => match Exit::from_panic(&*payload) {
            Some(exit) => Polled::Exit(exit.clone()),
            None => resume_unwind(payload),
        },
    })
}

/// What the boundary keeps of a request, to answer and log an exit.
///
/// Only the path is kept of the URI (one reference count on the request's
/// buffer): a whole `Uri` clone cost about 20 ns a request in
/// `benches/layers.rs`.
#[derive(Debug)]
pub(crate) struct Requested {
    pub(crate) version: Version,
    method: Method,
    path: Option<PathAndQuery>,
    /// A gRPC call: answered in gRPC's form.
    pub(crate) grpc: Option<Grpc>,
}

impl Requested {
    #[inline(always)]
    pub(crate) fn of<B>(req: &Request<B>) -> Self {
        Requested {
            version: req.version(),
            method: req.method().clone(),
            path: req.uri().path_and_query().cloned(),
            grpc: Grpc::of(req),
        }
    }
}

/// The exit in a response, if it is an exit's own (`IntoResponse for Exit`),
/// taken out. A response with no extensions at all (the common case) is
/// told apart without a call: `Extensions::remove` is not inlined, and cost
/// the one-layer stack about 5 ns a request in `benches/layers.rs`.
#[inline(always)]
pub(crate) fn take_exit_response<B>(res: &mut Response<B>) -> Option<Exit> {
    if res.extensions().is_empty() {
        return None;
    }
    res.extensions_mut()
        .remove::<ExitResponse>()
        .map(|ExitResponse(exit)| exit)
}

/// An exit turned into a response on its way out (`IntoResponse for Exit`
/// under the `axum` feature): the boundary, or a server when there is none,
/// records it as if it had been raised.
#[derive(Clone, Debug)]
pub(crate) struct ExitResponse(pub(crate) Exit);

/// The boundary caught `exit`: said once, here (INFO for status 0, WARN
/// otherwise), then recorded.
pub(crate) fn caught(supervisor: &Supervisor, exit: &Exit, request: &Requested) {
    // An armed exit in a forked child ends the child here, before the log
    // line allocates; otherwise the exit is said, then recorded.
    exit.end_if_armed();
    let first = supervisor.exit().is_none();
    let method = &request.method;
    let path = request.path.as_ref().map_or("/", PathAndQuery::path);
    if exit.is_success() {
        tracing::info!(exit.code = exit.code(), exit.message = exit.message(), %method, path, first, "exit: the server drains");
    } else {
        tracing::warn!(exit.code = exit.code(), exit.message = exit.message(), %method, path, first, "exit: the server drains");
    }
    supervisor.trigger(exit.clone());
}

/// `503`, and `connection: close` where HTTP/1 has it (HTTP/2 forbids the
/// header; the server's graceful shutdown sends GOAWAY there); a gRPC
/// call's `UNAVAILABLE` (see [`Grpc::exit`]). The exit rides in the
/// response's extensions, so that layers outside can tell an intended exit
/// from a real `503` (`res.extensions().get::<Exit>()`).
pub(crate) fn exit_response<B>(request: &Requested, exit: Exit) -> Response<ResponseBody<B>> {
    let version = request.version;
    if let Some(grpc) = request.grpc {
        return grpc.exit(ResponseBody::full(Bytes::new()), version, exit);
    }
    let mut res = Response::new(ResponseBody::full(Bytes::from_static(
        b"Service Unavailable\n",
    )));
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if version <= Version::HTTP_11 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res.extensions_mut().insert(exit);
    res
}

/// An exit escaped a service (no boundary caught it, or a layer raised it
/// again above one) and reached a server: said at ERROR, recorded.
#[cfg(all(unix, any(feature = "http", feature = "fastcgi")))]
#[cold]
pub(crate) fn escaped(supervisor: &Supervisor, exit: &Exit) {
    // An exit armed by a fork guard in a forked child ends that child here,
    // before the log line allocates: it must not answer the parent's client
    // nor stop the parent's server.
    exit.end_if_armed();
    tracing::error!(
        exit.code = exit.code(),
        exit.message = exit.message(),
        "exit escaped the service (no exit-aware boundary caught it): the server drains and ends with it"
    );
    supervisor.trigger(exit.clone());
}

/// Polls a response body (`poll`) inside an exit-aware frame: an exit
/// raised there is not said as unhandled, and comes back as the payload
/// for the caller to take.
#[inline]
pub(crate) fn catch_body<T>(poll: impl FnOnce() -> T) -> std::thread::Result<T> {
    let outer = enter_catching();
    let polled = catch_unwind(AssertUnwindSafe(poll));
    leave(outer);
    polled
}

/// An exit raised or returned while a response body streamed: the
/// response cannot be answered any more (its head is sent), so it is cut
/// after the bytes already sent; the exit is said once (INFO for status 0,
/// WARN otherwise) and recorded, and the server drains. An exit a frame
/// nearer the body took already (the boundary's body, then the server's)
/// is not said twice.
#[cold]
#[inline(never)]
pub(crate) fn caught_in_body(supervisor: &Supervisor, exit: &Exit) {
    exit.end_if_armed();
    let recorded = supervisor.exit();
    if recorded.as_ref() == Some(exit) {
        return;
    }
    let first = recorded.is_none();
    if exit.is_success() {
        tracing::info!(
            exit.code = exit.code(),
            exit.message = exit.message(),
            first,
            "exit in a response body: the response is cut, the server drains"
        );
    } else {
        tracing::warn!(
            exit.code = exit.code(),
            exit.message = exit.message(),
            first,
            "exit in a response body: the response is cut, the server drains"
        );
    }
    supervisor.trigger(exit.clone());
}
