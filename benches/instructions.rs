//! N calls of the one-layer stack (`stack`) or of no layer (`plain`), for
//! counting instructions under callgrind: a steadier measure than time on
//! a noisy machine. See BENCHMARKS.md for the command.
//!
//! A third argument picks the request: `get` (the default: no header),
//! `post` (`POST`, `content-type: application/json`) or `grpc` (`POST`,
//! `content-type: application/grpc`), to tell what a gRPC call costs
//! against an HTTP one.
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use std::convert::Infallible;
use std::future::{ready, Future};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use tower::{service_fn, Service, ServiceBuilder};
use tower_exit::report::Failure;

/// The request `one_call` sends.
#[derive(Clone, Copy)]
enum Kind {
    Get,
    Post,
    Grpc,
}

fn request(kind: Kind) -> Request<Full<Bytes>> {
    let content_type = match kind {
        Kind::Get => return Request::new(Full::default()),
        Kind::Post => "application/json",
        Kind::Grpc => "application/grpc",
    };
    let mut req = Request::new(Full::default());
    *req.method_mut() = http::Method::POST;
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    req
}

#[inline(never)]
fn one_call<S>(svc: &mut S, kind: Kind) -> S::Response
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let mut fut = pin!(svc.call(black_box(request(kind))));
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(res) => res.unwrap(),
        Poll::Pending => unreachable!(),
    }
}

fn main() {
    // `cargo bench` runs every bench target with `--bench`: nothing to do
    // then; callgrind runs this binary with `N stack|plain`.
    let Some(n) = std::env::args()
        .nth(1)
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return;
    };
    let supervisor = tower_exit::Supervisor::new();
    let reporter = |_: &Failure<'_>| {};
    let mut svc = ServiceBuilder::new()
        .layer(
            supervisor
                .stack()
                .report(reporter)
                .fork_guard(tower_exit::ForkGuardLayer::new()),
        )
        .service(service_fn(|_: Request<Full<Bytes>>| {
            ready(Ok::<_, Infallible>(Response::new(Full::new(
                Bytes::from_static(b"ok"),
            ))))
        }));
    let mut plain = service_fn(|_: Request<Full<Bytes>>| {
        ready(Ok::<_, Infallible>(Response::new(Full::new(
            Bytes::from_static(b"ok"),
        ))))
    });
    let which = std::env::args().nth(2).unwrap_or_default();
    let kind = match std::env::args().nth(3).as_deref() {
        Some("post") => Kind::Post,
        Some("grpc") => Kind::Grpc,
        _ => Kind::Get,
    };
    for _ in 0..n {
        if which == "stack" {
            black_box(one_call(&mut svc, kind));
        } else {
            black_box(one_call(&mut plain, kind));
        }
    }
}
