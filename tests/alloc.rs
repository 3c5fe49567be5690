//! The happy path through every layer allocates nothing: counted by a
//! global allocator, per thread, around `call` + `poll`.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::{ready, Future};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use tower::{service_fn, Service, ServiceBuilder};
use tower_exit::report::Failure;
use tower_exit::ServiceBuilderExt;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

/// Allocations made by one `poll_ready` + `call` + poll to completion.
fn count_one_call<S>(svc: &mut S) -> usize
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let req = Request::new(());
    let before = allocations();
    assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let mut fut = pin!(svc.call(req));
    let res = match fut.as_mut().poll(&mut cx) {
        Poll::Ready(res) => res,
        Poll::Pending => panic!("ready service"),
    };
    let after = allocations();
    drop(res.unwrap());
    after - before
}

type Reply = Result<Response<Full<Bytes>>, Infallible>;

fn inner() -> impl Service<
    Request<()>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = std::future::Ready<Reply>,
> + Clone {
    service_fn(|_: Request<()>| ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))))
}

#[test]
fn happy_path_allocates_nothing_in_any_layer() {
    let supervisor = tower_exit::Supervisor::new();
    let reporter = |_: &Failure<'_>| {};

    let mut bare = inner();
    let mut boundary = ServiceBuilder::new().boundary(&supervisor).service(inner());
    let mut report = ServiceBuilder::new().report(reporter).service(inner());
    let mut catch_panic = ServiceBuilder::new().catch_panic().service(inner());
    let mut fork_guard = ServiceBuilder::new().fork_guard().service(inner());
    let mut full = ServiceBuilder::new()
        .boundary(&supervisor)
        .report(reporter)
        .catch_panic()
        .fork_guard()
        .service(inner());
    let mut one_layer = ServiceBuilder::new()
        .layer(
            supervisor
                .stack()
                .report(reporter)
                .fork_guard(tower_exit::ForkGuardLayer::new()),
        )
        .service(inner());

    // Warm up lazily initialised statics (thread locals, the atfork handler).
    for _ in 0..2 {
        count_one_call(&mut bare);
        count_one_call(&mut full);
    }
    assert_eq!(count_one_call(&mut bare), 0, "baseline");
    assert_eq!(count_one_call(&mut boundary), 0, "boundary");
    assert_eq!(count_one_call(&mut report), 0, "report");
    assert_eq!(count_one_call(&mut catch_panic), 0, "catch_panic");
    assert_eq!(count_one_call(&mut fork_guard), 0, "fork_guard");
    assert_eq!(count_one_call(&mut full), 0, "full stack");
    assert_eq!(count_one_call(&mut one_layer), 0, "the stack as one layer");

    // The counter works: tower-http's catch-panic boxes the body.
    let mut tower_http = ServiceBuilder::new()
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .service(inner());
    count_one_call(&mut tower_http);
    assert!(count_one_call(&mut tower_http) > 0);
}

/// The tunnel's per-request cost: its slot (one `Arc`) and the request
/// extension that carries it (`http::Extensions` boxes the value, and
/// allocates its map on the first insert).
#[test]
fn tunnel_allocates_its_slot_and_one_request_extension() {
    let supervisor = tower_exit::Supervisor::new();
    let mut tunneled = ServiceBuilder::new()
        .boundary(&supervisor)
        .tunnel(tower_http::catch_panic::CatchPanicLayer::new())
        .service(inner());
    let mut foreign_only = ServiceBuilder::new()
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .service(inner());
    for _ in 0..2 {
        count_one_call(&mut tunneled);
        count_one_call(&mut foreign_only);
    }
    let added = count_one_call(&mut tunneled) - count_one_call(&mut foreign_only);
    // Arc slot + extension map box + map table + boxed extension value.
    assert_eq!(added, 4, "tunnel allocations per request");
}
