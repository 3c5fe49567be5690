//! axum 0.8: a `Router` with `HandleErrorLayer`, served by
//! `axum::serve(..).with_graceful_shutdown(supervisor.shutdown_signal())`.
//! An exit (from a handler, or as `Err` under `HandleErrorLayer`, tunneled)
//! gets its answer, in-flight requests finish, the server stops, and `main`
//! gets the code; a real failure is handled by `HandleErrorLayer` as before.

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
