//! tower-http's `CatchPanicLayer`, `TraceLayer` and `TimeoutLayer`, each
//! without and with the tunnel: a real failure still reaches the foreign
//! layer as before; an exit never does.

mod common;

use common::{handler, EXIT_ROUTES};
use http::{Request, Response, StatusCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::{ServiceBuilder, ServiceExt};
use tower_exit::{ServiceBuilderExt, Supervisor};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

fn req(path: &str) -> Request<String> {
    Request::get(path).body(String::new()).unwrap()
}

fn counting_catch_panic(
    seen: Arc<AtomicUsize>,
) -> CatchPanicLayer<impl Fn(Box<dyn std::any::Any + Send>) -> Response<String> + Clone> {
    CatchPanicLayer::custom(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
        let mut res = Response::new(String::from("crash"));
        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        res
    })
}

#[tokio::test]
async fn catch_panic_without_the_tunnel_turns_an_exit_into_a_500() {
    let seen = Arc::new(AtomicUsize::new(0));
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        .boundary(&supervisor)
        .layer(counting_catch_panic(seen.clone()))
        .service_fn(handler);
    let res = svc.oneshot(req("/exit/3")).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR, "the bug");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    assert!(supervisor.exit().is_none());
}

#[tokio::test]
async fn catch_panic_tunneled_still_catches_panics_and_never_sees_an_exit() {
    let seen = Arc::new(AtomicUsize::new(0));
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        .boundary(&supervisor)
        .tunnel(counting_catch_panic(seen.clone()))
        .service_fn(handler);

    let res = svc.clone().oneshot(req("/panic")).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(seen.load(Ordering::SeqCst), 1, "a real panic reaches it");

    for path in EXIT_ROUTES {
        let supervisor = Supervisor::new();
        let svc = ServiceBuilder::new()
            .boundary(&supervisor)
            .tunnel(counting_catch_panic(seen.clone()))
            .service_fn(handler);
        let res = svc.oneshot(req(path)).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(supervisor.exit().map(|e| e.code()), Some(3), "{path}");
    }
    assert_eq!(seen.load(Ordering::SeqCst), 1, "no exit reached it");
    let ok = svc.oneshot(req("/ok")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

/// A `TraceLayer` whose `on_failure` counts into `failures`.
macro_rules! counting_trace {
    ($failures:expr) => {{
        let failures = $failures.clone();
        TraceLayer::new_for_http().on_failure(
            move |_: ServerErrorsFailureClass, _: Duration, _: &tracing::Span| {
                failures.fetch_add(1, Ordering::SeqCst);
            },
        )
    }};
}

#[tokio::test]
async fn trace_on_failure_is_called_for_failures_and_never_for_a_tunneled_exit() {
    // Without the tunnel, an exit returned as `Err` is a "failure" to trace.
    let failures = Arc::new(AtomicUsize::new(0));
    let supervisor = Supervisor::new();
    let naive = ServiceBuilder::new()
        .boundary(&supervisor)
        .layer(counting_trace!(failures))
        .service_fn(handler);
    let res = naive.oneshot(req("/err/3")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        failures.load(Ordering::SeqCst),
        1,
        "the bug: an exit traced as a failure"
    );

    let failures = Arc::new(AtomicUsize::new(0));
    for path in EXIT_ROUTES {
        let supervisor = Supervisor::new();
        let svc = ServiceBuilder::new()
            .boundary(&supervisor)
            .catch_panic()
            .tunnel(counting_trace!(failures))
            .service_fn(handler);
        let res = svc.oneshot(req(path)).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(supervisor.exit().map(|e| e.code()), Some(3));
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0);

    let svc = ServiceBuilder::new()
        .boundary(&Supervisor::new())
        .catch_panic()
        .tunnel(counting_trace!(failures))
        .service_fn(handler);
    assert!(svc.oneshot(req("/fail")).await.is_err());
    assert_eq!(
        failures.load(Ordering::SeqCst),
        1,
        "a real failure is traced"
    );
}

#[tokio::test]
async fn timeout_still_fires_for_slow_requests_and_never_for_a_tunneled_exit() {
    let timeout =
        TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_millis(100));
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        .boundary(&supervisor)
        .catch_panic()
        .tunnel(timeout)
        .service_fn(handler);

    let res = svc.clone().oneshot(req("/slow")).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::REQUEST_TIMEOUT,
        "foreign layer works as before"
    );

    for path in EXIT_ROUTES {
        let started = Instant::now();
        let res = svc.clone().oneshot(req(path)).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{path}: answered before the timeout"
        );
    }
    assert_eq!(supervisor.exit().map(|e| e.code()), Some(3));
}
