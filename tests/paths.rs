//! The public paths name their items (common types at the root), and
//! every layer's service has tower-http's
//! accessors and a `new(inner, ..)` constructor that behaves as its layer.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use std::convert::Infallible;
use tower::{Service, ServiceExt};
use tower_exit::{Exit, Supervisor};

#[test]
fn the_public_paths_name_their_items() {
    let _: Option<tower_exit::fork::server::ForkServer> = None;
    let _: Option<tower_exit::fork::server::SpawnError> = None;
    let _: Option<tower_exit::serve::prefork::Prefork> = None;
    assert_eq!(tower_exit::serve::prefork::MAX_WORKERS, 1024);
    let _: fn(fn()) = |hook| tower_exit::fork::on_child_exit(hook);
    assert_eq!(tower_exit::fork::PANIC_STATUS, 101);
    // Common types at the root.
    let _: tower_exit::TracingReporter = tower_exit::report::TracingReporter;
}

type Svc = tower::util::ServiceFn<
    fn(Request<()>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>,
>;

fn exits(_: Request<()>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    tower_exit::exit(3)
}

fn inner() -> Svc {
    tower::service_fn(exits as fn(_) -> _)
}

#[tokio::test]
async fn services_are_built_with_new_and_give_their_inner_service_back() {
    let supervisor = Supervisor::new();
    let mut boundary = tower_exit::boundary::Boundary::new(
        tower_exit::catch_panic::CatchPanic::new(inner()),
        &supervisor,
    );
    let _: &Svc = boundary.get_ref().get_ref();
    let _: &mut Svc = boundary.get_mut().get_mut();
    let res = boundary
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(supervisor.exit().map(|e| e.code()), Some(3));
    let _: Svc = boundary.into_inner().into_inner();

    let reported = std::sync::Arc::new(std::sync::Mutex::new(0));
    let count = reported.clone();
    let report = tower_exit::report::Report::new(
        tower::service_fn(|_: Request<()>| async {
            Err::<Response<()>, _>(std::io::Error::other("down"))
        }),
        move |_: &tower_exit::report::Failure<'_>| *count.lock().unwrap() += 1,
    );
    let guard = tower_exit::fork_guard::ForkGuard::new(report, tower_exit::ForkGuardLayer::new());
    let _ = guard.get_ref();
    assert!(guard.oneshot(Request::new(())).await.is_err());
    assert_eq!(*reported.lock().unwrap(), 1);

    let tunnel =
        tower_exit::tunnel::Tunnel::new(inner(), &tower_http::catch_panic::CatchPanicLayer::new());
    let _ = tunnel.get_ref();
    let boundary = tower_exit::boundary::Boundary::new(tunnel, &supervisor);
    let res = boundary.oneshot(Request::new(())).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "tunneled past tower-http"
    );
    let _ = Exit::success();
}
