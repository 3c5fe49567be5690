//! An axum app with tower-exit, as an axum user writes it:
//!
//! `cargo run --example axum --features axum -- --listen 127.0.0.1:8080`
//!
//! Routes: `/` (hello), `/fail` (an app error: 500, reported), `/panic`
//! (500, reported), `/exit/N` (raises `exit(N)`), `/app-exit/N` (an exit
//! carried inside the app's error type, via `?`), `/result-exit/N` (a
//! handler returning `Result<_, Exit>`), `/slow` (answers after 1 s). An
//! exit answers `503`, lets `/slow` finish, and ends the process with `N`;
//! SIGTERM or Ctrl-C drains and ends it with 0.

use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::StatusCode;
use std::process::ExitCode;
use std::time::Duration;
use tower::ServiceBuilder;
use tower_exit::report::TracingReporter;
use tower_exit::{Exit, Supervisor};

/// The app's error type: a real failure, or an exit carried via `?`.
#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("database unavailable")]
    Database,
    // `#[from]` makes the exit this error's `source()`, where
    // `raise_if_found` looks. (`#[error(transparent)]` would hide it: it
    // forwards `source()` to the exit's own source, which is none.)
    #[error("{0}")]
    Exit(#[from] Exit),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        // The one line: an exit carried by the error goes on to the
        // boundary instead of becoming a 500.
        Exit::raise_if_found(&self);
        tracing::error!(error = %self, "request failed");
        (StatusCode::INTERNAL_SERVER_ERROR, "failed\n").into_response()
    }
}

/// Some work that may decide to end the program.
fn reload_config(code: i32) -> Result<(), Exit> {
    Err(Exit::new(code).with_message("configuration changed: restarting"))
}

async fn app_exit(Path(code): Path<i32>) -> Result<&'static str, AppError> {
    reload_config(code)?;
    Ok("unreachable\n")
}

async fn result_exit(Path(code): Path<i32>) -> Result<&'static str, Exit> {
    Err(Exit::new(code))
}

fn app(supervisor: &Supervisor) -> Router {
    Router::new()
        .route("/", get(|| async { "hello\n" }))
        .route("/fail", get(|| async { Err::<(), _>(AppError::Database) }))
        .route(
            "/panic",
            get(|| async {
                panic!("bug in handler");
                #[allow(unreachable_code)]
                ""
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
        .route("/app-exit/{code}", get(app_exit))
        .route("/result-exit/{code}", get(result_exit))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                "slow\n"
            }),
        )
        .layer(
            // The order, outermost first: trace sees every answer (an
            // exit's 503 is not logged as a failure), the timeout bounds
            // every request, then the exit-aware stack as one layer
            // (boundary, catch-panic, reporter).
            ServiceBuilder::new()
                .layer(tower_exit::trace::layer())
                .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    Duration::from_secs(10),
                ))
                .layer(supervisor.stack().report(TracingReporter)),
        )
}

fn listen_addr() -> String {
    let mut args = std::env::args().skip(1);
    let mut listen = "127.0.0.1:8080".to_owned();
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr,
            _ => {
                eprintln!("usage: axum [--listen HOST:PORT]");
                std::process::exit(2)
            }
        }
    }
    listen
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match run().await {
        Ok(exit) => exit.into(),
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> std::io::Result<Exit> {
    let listen = listen_addr();
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|err| {
            std::io::Error::new(err.kind(), format!("cannot listen on {listen}: {err}"))
        })?;
    println!("listening on {}", listener.local_addr()?);
    let supervisor = Supervisor::new();
    let app = app(&supervisor);
    tower_exit::serve::graceful(&supervisor, |shutdown| {
        axum::serve(listener, app).with_graceful_shutdown(shutdown)
    })
    .grace(Duration::from_secs(10))
    .with_signals()
    .await
}
