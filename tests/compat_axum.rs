//! axum 0.8: a `Router` with `HandleErrorLayer`, served by
//! `axum::serve(..).with_graceful_shutdown(supervisor.shutdown_signal())`.
//! An exit (from a handler, or as `Err` under `HandleErrorLayer`, tunneled)
//! gets its answer, in-flight requests finish, the server stops, and `main`
//! gets the code; a real failure is handled by `HandleErrorLayer` as before.

// The handlers that only exit must compile under edition 2024 too, where
// this lint is an error: an `async { exit(3) }` block would fall back to `!`.
#![deny(dependency_on_unit_never_type_fallback)]

mod common;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{Path, Request};
use axum::routing::get;
use axum::Router;
use common::get as http_get;
use http::StatusCode;
use std::process::ExitCode;
use std::time::Duration;
use tower::{BoxError, ServiceBuilder};
use tower_exit::{Exit, ServiceBuilderExt, Supervisor};

fn app(supervisor: &Supervisor) -> Router {
    // A fallible service made infallible by axum's `HandleErrorLayer`, which
    // would answer an exit with a 500: tunneled, it never sees one.
    let job = ServiceBuilder::new()
        .tunnel(HandleErrorLayer::new(|err: BoxError| async move {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("handled: {err}"))
        }))
        .service_fn(|req: Request| async move {
            let code: i32 = req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            if code == 0 {
                Err::<axum::response::Response, BoxError>("job failed".into())
            } else {
                Err(Exit::new(code).into())
            }
        });
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "slow"
            }),
        )
        .route(
            "/exit/{code}",
            get(|Path(code): Path<i32>| async move {
                tower_exit::exit(code);
                #[allow(unreachable_code)]
                ""
            }),
        )
        .route_service("/job/{code}", job)
        .layer(ServiceBuilder::new().boundary(supervisor).catch_panic())
}

/// The server's `main`, minus the listener: returns what `main` would.
async fn serve(listener: tokio::net::TcpListener, supervisor: Supervisor) -> ExitCode {
    axum::serve(listener, app(&supervisor))
        .with_graceful_shutdown(supervisor.shutdown_signal())
        .await
        .unwrap();
    supervisor.exit().map_or(ExitCode::FAILURE, ExitCode::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_drains_axum_and_becomes_the_exit_code() {
    for (exit_path, code) in [("/exit/4", 4u8), ("/job/5", 5)] {
        let supervisor = Supervisor::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, supervisor.clone()));

        let hello = http_get(addr, "/").await.unwrap();
        assert_eq!(
            (hello.status, hello.body.as_str()),
            (StatusCode::OK, "hello")
        );
        let failed = http_get(addr, "/job/0").await.unwrap();
        assert_eq!(
            (failed.status, failed.body.as_str()),
            (StatusCode::INTERNAL_SERVER_ERROR, "handled: job failed"),
            "a real failure is handled by HandleErrorLayer as before"
        );

        let slow = tokio::spawn(http_get(addr, "/slow"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let exited = http_get(addr, exit_path).await.unwrap();
        assert_eq!(
            exited.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{exit_path}"
        );

        let slow = slow.await.unwrap().unwrap();
        assert_eq!(
            (slow.status, slow.body.as_str()),
            (StatusCode::OK, "slow"),
            "in flight: finished"
        );
        let main_returns = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops")
            .unwrap();
        assert_eq!(main_returns, ExitCode::from(code));
        assert!(http_get(addr, "/").await.is_err(), "no longer accepting");
    }
}

// ---------------------------------------------------------------------------
// The patterns axum users write (issue 14).
// ---------------------------------------------------------------------------

use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use common::logs::{capture, Logs};
use std::future::IntoFuture;
use tower_exit::exit;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("database unavailable")]
    Database,
    #[error("{0}")]
    Exit(#[from] Exit),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        Exit::raise_if_found(&self);
        (StatusCode::INTERNAL_SERVER_ERROR, "app error").into_response()
    }
}

fn stop(code: i32) -> Result<(), Exit> {
    Err(Exit::new(code).with_message("stop"))
}

async fn slow() -> &'static str {
    tokio::time::sleep(Duration::from_millis(300)).await;
    "slow"
}

/// A handler that does nothing but end the work by raising.
async fn only_raise(Path(code): Path<i32>) {
    tower_exit::exit(code)
}

/// Every handler pattern: `/app-exit/N` (an exit inside the app's error
/// type via `?`), `/app-fail` (a real app error), `/result-exit/N`
/// (`Result<_, Exit>`), `/spawn-exit/N` (raised in an `exit::spawn` task,
/// joined), `/raise/N`, `/only-exit/N` and `/only-raise/N` (handlers that
/// do nothing but end the work, in the README's idioms), `/panic`, `/slow`,
/// `/`.
fn routes() -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/slow", get(slow))
        .route(
            "/app-exit/{code}",
            get(|Path(code): Path<i32>| async move {
                stop(code)?;
                Ok::<_, AppError>("unreachable")
            }),
        )
        .route(
            "/app-fail",
            get(|| async { Err::<(), _>(AppError::Database) }),
        )
        .route(
            "/result-exit/{code}",
            get(|Path(code): Path<i32>| async move { Err::<(), _>(Exit::new(code)) }),
        )
        .route(
            "/spawn-exit/{code}",
            get(|Path(code): Path<i32>| async move {
                let task = exit::spawn(async move {
                    tokio::task::yield_now().await;
                    tower_exit::exit(code)
                });
                exit::join::<(), _>(task)
                    .await
                    .map_err(|f| format!("{f:?}"))
                    .unwrap();
                "unreachable"
            }),
        )
        .route(
            "/raise/{code}",
            get(|Path(code): Path<i32>| async move {
                tower_exit::exit(code);
                #[allow(unreachable_code)]
                ""
            }),
        )
        // A handler that only exits: return the exit (a response: the
        // boundary records it; works in abort builds too)...
        .route(
            "/only-exit/{code}",
            get(|Path(code): Path<i32>| async move { Exit::new(code) }),
        )
        // ... or raise it in a handler whose return type is written out
        // (an `async fn`: an async block's type would fall back from `!`).
        .route("/only-raise/{code}", get(only_raise))
        .route(
            "/panic",
            get(|| async {
                panic!("bug");
                #[allow(unreachable_code)]
                ""
            }),
        )
}

/// Serves `app` with `axum::serve` through `serve::graceful`; the address
/// and the server's result.
async fn serve_axum(
    app: Router,
    supervisor: &Supervisor,
    grace: Duration,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<Exit>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tower_exit::serve::graceful(supervisor, |shutdown| {
        axum::serve(listener, app).with_graceful_shutdown(shutdown)
    })
    .grace(grace)
    .into_future();
    (addr, tokio::spawn(server))
}

/// One exit path against a fresh server: `/slow` in flight is answered, the
/// exit answers 503, the server ends with `code`.
async fn exits_with(app: Router, supervisor: &Supervisor, path: &str, code: i32) {
    let (addr, server) = serve_axum(app, supervisor, Duration::from_secs(5)).await;
    assert_eq!(http_get(addr, "/").await.unwrap().status, StatusCode::OK);
    let in_flight = tokio::spawn(http_get(addr, "/slow"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let exited = http_get(addr, path).await.unwrap();
    assert_eq!(exited.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
    let in_flight = in_flight.await.unwrap().unwrap();
    assert_eq!(
        (in_flight.status, in_flight.body.as_str()),
        (StatusCode::OK, "slow")
    );
    let exit = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("drains")
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), code, "{path}");
}

fn boundary_events(logs: &Logs) -> Vec<common::logs::Event> {
    logs.with_message("exit: the server drains")
}

#[tokio::test(flavor = "current_thread")]
async fn every_handler_pattern_ends_the_server_with_the_exit_code() {
    for (path, code) in [
        ("/app-exit/4", 4),
        ("/result-exit/5", 5),
        ("/spawn-exit/6", 6),
        ("/raise/7", 7),
        ("/only-exit/8", 8),
        ("/only-raise/9", 9),
    ] {
        for route_layer in [false, true] {
            let (logs, _guard) = capture();
            let supervisor = Supervisor::new();
            let stack = ServiceBuilder::new().boundary(&supervisor).catch_panic();
            let app = if route_layer {
                routes().route_layer(stack)
            } else {
                routes().layer(stack)
            };
            exits_with(app, &supervisor, path, code).await;
            let events = boundary_events(&logs);
            assert_eq!(events.len(), 1, "{path}: {events:?}");
            let event = &events[0];
            assert_eq!(event.level, tracing::Level::WARN);
            assert_eq!(event.get("exit.code"), Some(code.to_string().as_str()));
            assert_eq!(event.get("path"), Some(path));
            assert_eq!(event.get("method"), Some("GET"));
            assert!(
                logs.with_message("nothing exit-aware catches it")
                    .is_empty(),
                "{path}: not flagged"
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_real_app_error_is_still_a_500() {
    let supervisor = Supervisor::new();
    let app = routes().layer(ServiceBuilder::new().boundary(&supervisor).catch_panic());
    let (addr, server) = serve_axum(app, &supervisor, Duration::from_secs(5)).await;
    let failed = http_get(addr, "/app-fail").await.unwrap();
    assert_eq!(
        (failed.status, failed.body.as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "app error")
    );
    assert!(supervisor.exit().is_none());
    supervisor.trigger(Exit::success());
    assert_eq!(server.await.unwrap().unwrap().code(), 0);
}

async fn exit_in_middleware(req: axum::extract::Request, next: Next) -> Response {
    if req.uri().path() == "/mw-exit" {
        tower_exit::exit(8);
    }
    next.run(req).await
}

#[tokio::test(flavor = "current_thread")]
async fn a_from_fn_middleware_raising_inside_the_boundary_ends_the_server() {
    let supervisor = Supervisor::new();
    let app = routes()
        .layer(middleware::from_fn(exit_in_middleware))
        .layer(ServiceBuilder::new().boundary(&supervisor).catch_panic());
    exits_with(app, &supervisor, "/mw-exit", 8).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_from_fn_middleware_raising_outside_the_boundary_is_never_lost() {
    // Under `serve::http`: the server takes the escaped exit.
    let (logs, _guard) = capture();
    let supervisor = Supervisor::new();
    let app = routes()
        .layer(ServiceBuilder::new().boundary(&supervisor).catch_panic())
        .layer(middleware::from_fn(exit_in_middleware));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tower_exit::serve::http(listener, app, &supervisor)
            .grace(Duration::from_secs(5))
            .into_future(),
    );
    let in_flight = tokio::spawn(http_get(addr, "/slow"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let exited = http_get(addr, "/mw-exit").await.unwrap();
    assert_eq!(exited.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(in_flight.await.unwrap().unwrap().status, StatusCode::OK);
    let exit = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("drains")
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), 8);
    assert_eq!(logs.with_message("exit escaped the service").len(), 1);

    // Under `axum::serve`, which knows nothing of exits: the client's
    // connection is cut, but the exit is said at ERROR where it was raised.
    let (logs, _guard) = capture();
    let supervisor = Supervisor::new();
    let app = routes()
        .layer(ServiceBuilder::new().boundary(&supervisor).catch_panic())
        .layer(middleware::from_fn(exit_in_middleware));
    let (addr, server) = serve_axum(app, &supervisor, Duration::from_secs(1)).await;
    assert!(http_get(addr, "/mw-exit").await.is_err(), "connection cut");
    let flagged = logs.with_message("nothing exit-aware catches it");
    assert_eq!(flagged.len(), 1, "{:?}", logs.events());
    assert_eq!(flagged[0].get("exit.code"), Some("8"));
    assert!(flagged[0]
        .get("at")
        .unwrap()
        .starts_with("tests/compat_axum.rs:"));
    supervisor.trigger(Exit::success());
    assert_eq!(server.await.unwrap().unwrap().code(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn the_readme_order_with_trace_and_timeout_logs_every_completion() {
    let (logs, _guard) = capture();
    let supervisor = Supervisor::new();
    // The README's order, outermost first: trace, timeout, the exit-aware
    // stack. (`TimeoutLayer` needs `ResponseBody: Default`.)
    let app = routes().layer(
        ServiceBuilder::new()
            .layer(tower_exit::trace::layer())
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_secs(5),
            ))
            .boundary(&supervisor)
            .catch_panic()
            .report(tower_exit::report::TracingReporter),
    );
    let (addr, server) = serve_axum(app, &supervisor, Duration::from_secs(5)).await;
    assert_eq!(http_get(addr, "/").await.unwrap().status, StatusCode::OK);
    assert_eq!(
        http_get(addr, "/panic").await.unwrap().status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let exited = http_get(addr, "/raise/9").await.unwrap();
    assert_eq!(exited.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.await.unwrap().unwrap().code(), 9);

    // tower-http's `TraceLayer` logged the completion of all three.
    let finished = logs.with_message("finished processing request");
    let statuses: Vec<_> = finished.iter().filter_map(|e| e.get("status")).collect();
    assert_eq!(statuses, ["200", "500", "503"], "{:?}", logs.events());
    // The panic is a failure; the exit's 503 is not.
    let failures = logs.with_message("response failed");
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].get("classification").unwrap().contains("500"));
    // The exit was said once, by the boundary, never reported.
    assert_eq!(boundary_events(&logs).len(), 1);
    assert!(logs.with_message("service exited").is_empty());
    // No event carries a field twice.
    for event in logs.events() {
        let mut names: Vec<_> = event.fields.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        let all = names.len();
        names.dedup();
        assert_eq!(names.len(), all, "duplicate field in {event:?}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_grace_period_bounds_the_drain_of_axum_serve() {
    let supervisor = Supervisor::new();
    let app = Router::new()
        .route(
            "/stuck",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .layer(ServiceBuilder::new().boundary(&supervisor).catch_panic());
    let (addr, server) = serve_axum(app, &supervisor, Duration::from_millis(300)).await;
    let stuck = tokio::spawn(http_get(addr, "/stuck"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    supervisor.trigger(Exit::new(2));
    let exit = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the grace period ends the drain")
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), 2);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // axum runs each connection as a task of its own: those end with the
    // runtime, when `main` returns (documented on `serve::Graceful`).
    stuck.abort();
}

#[tokio::test(flavor = "current_thread")]
async fn serve_http_serves_a_router() {
    let supervisor = Supervisor::new();
    let app = routes().layer(ServiceBuilder::new().boundary(&supervisor).catch_panic());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(tower_exit::serve::http(listener, app, &supervisor).into_future());
    let hello = http_get(addr, "/").await.unwrap();
    assert_eq!(
        (hello.status, hello.body.as_str()),
        (StatusCode::OK, "hello")
    );
    assert_eq!(
        http_get(addr, "/result-exit/3").await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(server.await.unwrap().unwrap().code(), 3);
}

/// The example as its users run it: SIGTERM drains (`/slow` answered) and
/// the process ends with 0; `/app-exit/N` ends it with N.
#[test]
fn the_axum_example_drains_on_sigterm_and_ends_with_an_exits_code() {
    use common::demo::{example, Proc};
    let start = || {
        let mut command = std::process::Command::new(example("axum"));
        command.args(["--listen", "127.0.0.1:0"]);
        let proc = Proc::spawn(command);
        let addr: std::net::SocketAddr = proc.wait_for_line("listening on ").parse().unwrap();
        (proc, addr)
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let (mut proc, addr) = start();
    let in_flight = runtime.spawn(http_get(addr, "/slow"));
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: a signal to the process this test started.
    assert_eq!(unsafe { libc::kill(proc.pid() as i32, libc::SIGTERM) }, 0);
    let slow = runtime.block_on(in_flight).unwrap().unwrap();
    assert_eq!(slow.status, StatusCode::OK);
    assert_eq!(proc.wait_exit(Duration::from_secs(10)).code(), Some(0));

    let (mut proc, addr) = start();
    let exited = runtime.block_on(http_get(addr, "/app-exit/7")).unwrap();
    assert_eq!(exited.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(proc.wait_exit(Duration::from_secs(10)).code(), Some(7));
}
