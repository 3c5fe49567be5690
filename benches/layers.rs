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
    one_call_of(svc, || Request::new(Full::default()))
}

#[inline(always)]
fn one_call_of<S>(svc: &mut S, request: impl Fn() -> Request<Full<Bytes>>) -> S::Response
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let mut fut = pin!(svc.call(black_box(request())));
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
        "tower-exit stack as one layer",
        ServiceBuilder::new()
            .layer(
                supervisor
                    .stack()
                    .report(reporter)
                    .fork_guard(tower_exit::ForkGuardLayer::new()),
            )
            .service(inner()),
    );
    bench(
        c,
        "tower-exit full stack",
        ServiceBuilder::new()
            .boundary(&supervisor)
            .catch_panic()
            .report(reporter)
            .fork_guard()
            .service(inner()),
    );
}

/// A `POST` with `content_type`.
fn post(content_type: &'static str) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::default());
    *req.method_mut() = http::Method::POST;
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    req
}

/// A gRPC call against an HTTP `POST` through the one layer (issue 26: the
/// gRPC form of the answers costs nothing on the happy path), and each
/// through no layer.
fn grpc(c: &mut Criterion) {
    let supervisor = tower_exit::Supervisor::new();
    let mut group = c.benchmark_group("POST");
    for (name, content_type) in [("json", "application/json"), ("grpc", "application/grpc")] {
        let mut plain = inner();
        group.bench_function(format!("no layer, {name}"), |b| {
            b.iter(|| black_box(one_call_of(&mut plain, || post(content_type))))
        });
        let mut stack = ServiceBuilder::new()
            .layer(supervisor.stack())
            .service(inner());
        group.bench_function(format!("stack as one layer, {name}"), |b| {
            b.iter(|| black_box(one_call_of(&mut stack, || post(content_type))))
        });
    }
    group.finish();
}

/// An exit from the handler to the boundary through six layers, as unwind
/// and as `Err`, against a plain error through the same stack; with a
/// tunnel in the stack too.
fn exit_propagation(c: &mut Criterion) {
    type Reply = std::future::Ready<Result<Response<Full<Bytes>>, tower::BoxError>>;
    fn raise(_: Request<Full<Bytes>>) -> Reply {
        tower_exit::exit(3)
    }
    fn exit_err(_: Request<Full<Bytes>>) -> Reply {
        ready(Err(tower_exit::Exit::new(3).into()))
    }
    fn plain_err(_: Request<Full<Bytes>>) -> Reply {
        ready(Err("boom".into()))
    }
    let supervisor = tower_exit::Supervisor::new();
    let reporter = |_: &Failure<'_>| {};
    let six = |handler: fn(Request<Full<Bytes>>) -> Reply| {
        ServiceBuilder::new()
            .boundary(&supervisor)
            .catch_panic()
            .report(reporter)
            .catch_panic()
            .report(reporter)
            .fork_guard()
            .service_fn(handler)
    };
    let tunneled = |handler: fn(Request<Full<Bytes>>) -> Reply| {
        ServiceBuilder::new()
            .boundary(&supervisor)
            .catch_panic()
            .report(reporter)
            .tunnel(tower_http::catch_panic::CatchPanicLayer::new())
            .report(reporter)
            .fork_guard()
            .service_fn(handler)
    };
    // Each call ends in `Err` (a plain error) or a 503 (an exit).
    fn run<S: Service<Request<Full<Bytes>>>>(svc: &mut S) {
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        let mut fut = pin!(svc.call(black_box(Request::new(Full::default()))));
        assert!(fut.as_mut().poll(&mut cx).is_ready());
    }
    let mut group = c.benchmark_group("exit through 6 layers");
    // The floor under "exit as unwind": what one unwind costs in Rust here,
    // raised with `resume_unwind` and caught once by `catch_unwind`, no
    // layer at all. Each layer that must look at an unwind pays about this.
    group.bench_function(
        "one bare unwind, caught once (floor per catching layer)",
        |b| {
            b.iter(|| {
                let caught = std::panic::catch_unwind(|| {
                    std::panic::resume_unwind(Box::new(black_box(tower_exit::Exit::new(3))))
                });
                black_box(caught.is_err())
            })
        },
    );
    let mut svc = six(plain_err);
    group.bench_function("plain Err (baseline)", |b| b.iter(|| run(&mut svc)));
    let mut svc = six(exit_err);
    group.bench_function("exit as Err", |b| b.iter(|| run(&mut svc)));
    let mut svc = six(raise);
    group.bench_function("exit as unwind", |b| b.iter(|| run(&mut svc)));
    let mut svc = tunneled(exit_err);
    group.bench_function("exit as Err, tunneled", |b| b.iter(|| run(&mut svc)));
    let mut svc = tunneled(raise);
    group.bench_function("exit as unwind, tunneled", |b| b.iter(|| run(&mut svc)));
    group.finish();
}

/// The tunnel's happy-path cost per request, next to the foreign layer alone.
fn tunnel(c: &mut Criterion) {
    bench(
        c,
        "tower-http catch_panic, tunneled",
        ServiceBuilder::new()
            .tunnel(tower_http::catch_panic::CatchPanicLayer::new())
            .service(inner()),
    );
}

/// `fork::spawn` of a child that returns at once, and waiting for it.
fn fork_spawn(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    c.bench_function("fork::spawn + wait", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let mut child = tower_exit::fork::spawn(|| {}).unwrap();
                assert!(child.wait().await.unwrap().success());
            })
        })
    });
}

criterion_group!(benches, layers, grpc, exit_propagation, tunnel, fork_spawn);
criterion_main!(benches);
