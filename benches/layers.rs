//! Happy-path cost of each layer per call, against no layer and against
//! tower-http's `CatchPanicLayer`, in one run. Read the ratios, not the
//! absolute times: see BENCHMARKS.md.
//!
//! Each iteration is one `poll_ready` + `call` + poll to completion of a
//! ready inner service, with a no-op waker: what the layer adds, nothing
//! else (no runtime, no I/O).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::Full;
use std::convert::Infallible;
use std::future::{ready, Future};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use tower::{service_fn, Service, ServiceBuilder};
use tower_exit::report::Failure;
use tower_exit::ServiceBuilderExt;

type Reply = Result<Response<Full<Bytes>>, Infallible>;

fn inner() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = std::future::Ready<Reply>,
> + Clone {
    service_fn(|_: Request<Full<Bytes>>| {
        ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
    })
}

#[inline(always)]
fn one_call<S>(svc: &mut S) -> S::Response
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let mut fut = pin!(svc.call(black_box(Request::new(Full::default()))));
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(res) => res.unwrap(),
        Poll::Pending => unreachable!("ready service"),
    }
}

fn bench<S>(c: &mut Criterion, name: &str, mut svc: S)
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    c.bench_function(name, |b| b.iter(|| black_box(one_call(&mut svc))));
}

fn layers(c: &mut Criterion) {
    let supervisor = tower_exit::Supervisor::new();
    let reporter = |_: &Failure<'_>| {};

    bench(c, "no layer", inner());
    bench(
        c,
        "tower-http catch_panic",
        ServiceBuilder::new()
            .layer(tower_http::catch_panic::CatchPanicLayer::new())
            .service(inner()),
    );
    bench(
        c,
        "tower-http catch_panic + trace",
        ServiceBuilder::new()
            .layer(tower_http::catch_panic::CatchPanicLayer::new())
            .layer(tower_http::trace::TraceLayer::new_for_http())
            .service(inner()),
    );
    bench(
        c,
        "tower-exit catch_panic",
        ServiceBuilder::new().catch_panic().service(inner()),
    );
    bench(
        c,
        "tower-exit report",
        ServiceBuilder::new().report(reporter).service(inner()),
    );
    bench(
        c,
        "tower-exit boundary",
        ServiceBuilder::new().boundary(&supervisor).service(inner()),
    );
    bench(
        c,
        "tower-exit fork_guard",
        ServiceBuilder::new().fork_guard().service(inner()),
    );
    bench(
        c,
        "tower-exit full stack",
        ServiceBuilder::new()
            .boundary(&supervisor)
            .report(reporter)
            .catch_panic()
            .fork_guard()
            .service(inner()),
    );
}

criterion_group!(benches, layers);
criterion_main!(benches);
