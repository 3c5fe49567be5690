//! The table of DESIGN.md, row by row, for the core layers, in both orders
//! of stacking, for every way a handler can exit.

// The services are `Copy` here, `Clone` in general: tests read as users write.
#![allow(clippy::clone_on_copy)]

mod common;

use bytes::Bytes;
use common::{handler, EXIT_ROUTES};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tower::retry::{Policy, RetryLayer};
use tower::{service_fn, BoxError, ServiceBuilder, ServiceExt};
use tower_exit::report::Failure;
use tower_exit::{
    retry::ExitAware, CatchPanicLayer, Exit, ReportLayer, ServiceBuilderExt, Supervisor,
};

#[derive(Clone, Default)]
struct Reports(Arc<Mutex<Vec<String>>>);

impl Reports {
    fn reporter(&self) -> impl Fn(&Failure<'_>) + Send + Sync + 'static {
        let reports = self.0.clone();
        move |failure: &Failure<'_>| reports.lock().unwrap().push(failure.to_string())
    }
    fn taken(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

fn req(path: &str) -> Request<()> {
    Request::get(path).body(()).unwrap()
}

/// Runs `fut`, returning the unwind payload if it unwound.
async fn unwinds<T>(
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, Box<dyn std::any::Any + Send>>
where
    T: Send + 'static,
{
    tokio::spawn(fut).await.map_err(|err| err.into_panic())
}

#[tokio::test]
async fn catch_panic_answers_500_for_a_panic_and_lets_every_exit_unwind() {
    let svc = ServiceBuilder::new().catch_panic().service_fn(handler);
    let res = svc.clone().oneshot(req("/panic")).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let res = svc.clone().oneshot(req("/ok")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let err = svc.clone().oneshot(req("/fail")).await.unwrap_err();
    assert_eq!(err.to_string(), "database is down");

    for path in ["/exit/3", "/nested/3", "/spawn/3", "/blocking/3"] {
        let payload = unwinds(svc.clone().oneshot(req(path))).await.unwrap_err();
        let exit = Exit::from_panic(&*payload).unwrap_or_else(|| panic!("{path}: not an exit"));
        assert_eq!(exit.code(), 3, "{path}");
    }
    for path in ["/err/3", "/io/3"] {
        let err = svc.clone().oneshot(req(path)).await.unwrap_err();
        assert_eq!(Exit::from_service_error(&err).unwrap().code(), 3, "{path}");
    }
}

#[tokio::test]
async fn catch_panic_keeps_the_exit_payload_untouched_in_call_too() {
    // A service that raises in `call`, before returning a future.
    let svc = ServiceBuilder::new().catch_panic().service(service_fn(
        |_: Request<()>| -> Ready<Result<Response<Full<Bytes>>, BoxError>> {
            Exit::failure("no config").raise()
        },
    ));
    let payload = unwinds(svc.oneshot(req("/"))).await.unwrap_err();
    let exit = Exit::from_panic(&*payload).unwrap();
    assert_eq!((exit.code(), exit.message()), (1, Some("no config")));
}

#[tokio::test]
async fn custom_panic_handler_answers_real_panics_only() {
    let svc = ServiceBuilder::new()
        .layer(CatchPanicLayer::custom(
            |payload: Box<dyn std::any::Any + Send>| {
                let msg = payload.downcast_ref::<&str>().copied().unwrap_or("?");
                let mut res = Response::new(Bytes::from(format!("custom: {msg}")));
                *res.status_mut() = StatusCode::BAD_GATEWAY;
                res
            },
        ))
        .service_fn(handler);
    let res = svc.clone().oneshot(req("/panic")).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"custom: bug in handler");
    assert!(unwinds(svc.oneshot(req("/exit/2"))).await.is_err());
}

#[tokio::test]
async fn report_reports_each_failure_once_and_never_an_exit() {
    let reports = Reports::default();
    let svc = ServiceBuilder::new()
        .report(reports.reporter())
        .service_fn(handler);

    assert!(svc.clone().oneshot(req("/ok")).await.is_ok());
    assert!(reports.taken().is_empty());

    let err = svc.clone().oneshot(req("/fail")).await.unwrap_err();
    assert_eq!(err.to_string(), "database is down", "passed on unchanged");
    assert_eq!(reports.taken(), ["database is down"]);

    let payload = unwinds(svc.clone().oneshot(req("/panic")))
        .await
        .unwrap_err();
    assert_eq!(
        payload.downcast_ref::<&str>(),
        Some(&"bug in handler"),
        "unwinds on unchanged"
    );
    assert_eq!(reports.taken(), ["panicked: bug in handler"]);

    for path in EXIT_ROUTES {
        let outcome = unwinds(svc.clone().oneshot(req(path))).await;
        let code = match &outcome {
            Err(payload) => Exit::from_panic(&**payload).map(Exit::code),
            Ok(Err(err)) => Exit::from_service_error(err).map(Exit::code),
            Ok(Ok(_)) => None,
        };
        assert_eq!(code, Some(3), "{path} passed on");
        assert!(reports.taken().is_empty(), "{path} was reported");
    }
}

#[tokio::test]
async fn report_reads_concrete_error_chains() {
    #[derive(Debug, thiserror::Error)]
    enum AppError {
        #[error("shutting down")]
        Shutdown(#[source] Exit),
        #[error("query failed")]
        Query(#[source] std::io::Error),
    }
    let reports = Reports::default();
    let svc =
        ServiceBuilder::new()
            .report(reports.reporter())
            .service_fn(|exit: bool| async move {
                if exit {
                    Err::<(), _>(AppError::Shutdown(Exit::new(4)))
                } else {
                    Err(AppError::Query(std::io::Error::other("timeout")))
                }
            });
    assert!(svc.clone().oneshot(true).await.is_err());
    assert!(reports.taken().is_empty());
    assert!(svc.oneshot(false).await.is_err());
    assert_eq!(reports.taken(), ["query failed: timeout"]);
}

/// Retries every error, up to `n` times: the naive policy.
#[derive(Clone)]
struct RetryAll(usize);

impl<Req: Clone, Res, E> Policy<Req, Res, E> for RetryAll {
    type Future = Ready<()>;
    fn retry(&mut self, _: &mut Req, result: &mut Result<Res, E>) -> Option<Ready<()>> {
        (result.is_err() && self.0 > 0).then(|| {
            self.0 -= 1;
            ready(())
        })
    }
    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

#[tokio::test]
async fn exit_aware_retry_never_retries_an_exit_and_leaves_failures_to_the_policy() {
    for (path, attempts) in [("/fail", 4), ("/err/3", 1), ("/io/3", 1), ("/ok", 1)] {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let svc = ServiceBuilder::new()
            .layer(RetryLayer::new(ExitAware::new(RetryAll(3))))
            .service_fn(move |path: String| {
                counter.fetch_add(1, Ordering::SeqCst);
                handler(req(&path))
            });
        let _ = svc.oneshot(path.to_owned()).await;
        assert_eq!(calls.load(Ordering::SeqCst), attempts, "{path}");
    }
    // Without the wrapper the naive policy retries the exit: the bug.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let naive = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryAll(3)))
        .service_fn(move |path: String| {
            counter.fetch_add(1, Ordering::SeqCst);
            handler(req(&path))
        });
    let _ = naive.oneshot("/err/3".to_owned()).await;
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

/// The order that reports panics: catch-panic above the reporter.
/// And the order that does not: the reporter above catch-panic only sees a 500.
#[tokio::test]
async fn boundary_answers_every_exit_with_503_in_both_orders() {
    for report_below_catch_panic in [false, true] {
        for path in EXIT_ROUTES {
            let reports = Reports::default();
            let supervisor = Supervisor::new();
            let svc = if report_below_catch_panic {
                ServiceBuilder::new()
                    .boundary(&supervisor)
                    .catch_panic()
                    .report(reports.reporter())
                    .service_fn(handler)
                    .boxed_clone()
            } else {
                ServiceBuilder::new()
                    .boundary(&supervisor)
                    .report(reports.reporter())
                    .catch_panic()
                    .service_fn(handler)
                    .boxed_clone()
            };
            let res = svc.clone().oneshot(req(path)).await.unwrap();
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
            assert_eq!(res.headers()["connection"], "close");
            assert_eq!(supervisor.exit().map(|e| e.code()), Some(3), "{path}");
            tokio::time::timeout(
                std::time::Duration::from_secs(1),
                supervisor.shutdown_signal(),
            )
            .await
            .expect("shutdown signal fires");
            assert!(reports.taken().is_empty(), "{path} reported");

            // A second exit does not replace the first.
            let _ = svc.clone().oneshot(req("/exit/9")).await.unwrap();
            assert_eq!(supervisor.exit().map(|e| e.code()), Some(3));

            // Real failures pass through the boundary.
            let res = svc.clone().oneshot(req("/panic")).await.unwrap();
            assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
            let expected_panic_reports = usize::from(report_below_catch_panic);
            assert_eq!(reports.taken().len(), expected_panic_reports);
            let err = svc.clone().oneshot(req("/fail")).await.unwrap_err();
            assert_eq!(err.to_string(), "database is down");
            assert_eq!(reports.taken().len(), 1);
        }
    }
}

#[tokio::test]
async fn boundary_lets_a_real_panic_unwind_when_nothing_catches_it() {
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        .boundary(&supervisor)
        .service_fn(handler);
    let payload = unwinds(svc.oneshot(req("/panic"))).await.unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"bug in handler"));
    assert!(supervisor.exit().is_none());
}

#[tokio::test]
async fn supervisor_wait_resolves_to_the_first_exit() {
    let supervisor = Supervisor::new();
    let waiter = tokio::spawn(supervisor.wait());
    assert!(supervisor.trigger(Exit::new(5)));
    assert!(!supervisor.trigger(Exit::new(6)));
    assert_eq!(waiter.await.unwrap().code(), 5);
    // Late subscribers resolve at once.
    assert_eq!(supervisor.wait().await.code(), 5);
    let code: std::process::ExitCode = supervisor.exit().unwrap().into();
    assert_eq!(code, std::process::ExitCode::from(5));
}

#[test]
fn layers_and_services_are_clone_and_futures_send() {
    fn assert_send<T: Send>(_: &T) {}
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        .boundary(&supervisor)
        .layer(ReportLayer::default())
        .catch_panic()
        .service_fn(handler::<()>);
    let fut = svc.clone().oneshot(req("/ok"));
    assert_send(&fut);
}
