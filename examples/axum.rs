//! An axum app with tower-exit, as an axum user writes it:
//!
//! `cargo run --example axum --features axum -- --listen 127.0.0.1:8080`
//!
//! Routes: `/` (hello), `/fail` (an app error: 500, reported), `/panic`
//! (500, reported), `/exit/N` (raises `exit(N)`), `/app-exit/N` (an exit
//! carried inside the app's error type, via `?`), `/result-exit/N` (a
//! handler returning `Result<_, Exit>`), `/slow` (answers after 1 s),
//! `/peer` (the client's address, axum's `ConnectInfo`), `/ws` (a WebSocket
//! echo that says goodbye, close 1001, when the server drains), `/ready`
//! and `/live` (the probes; `--shutdown-delay SECS` serves on that long
//! after SIGTERM, not ready, before draining). An exit
//! answers `503`, lets `/slow` finish and the WebSockets close, and ends the
//! process with `N`; SIGTERM or Ctrl-C drains and ends it with 0.
//!
//! `--server axum` (the default) serves with `axum::serve` through
//! `tower_exit::serve::graceful`; `--server http` with
//! `tower_exit::serve::http` (`--max-connections N` caps its connections).

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use http::StatusCode;
use std::net::SocketAddr;
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

/// A WebSocket that echoes until the server drains, then says goodbye:
/// close 1001 ("going away"), so that the client reconnects elsewhere.
///
/// The handler holds the supervisor (as axum state) for two things: a
/// [`Hold`](tower_exit::Hold), taken before the upgrade, keeps the drain
/// waiting for this socket (up to the grace period), and
/// `shutdown_signal()` tells it that the drain started (at once if it
/// already has: no race between the two).
async fn ws_echo(ws: WebSocketUpgrade, State(supervisor): State<Supervisor>) -> Response {
    let hold = supervisor.hold();
    ws.on_upgrade(move |socket| async move {
        let _hold = hold;
        echo_until(socket, supervisor.shutdown_signal()).await;
    })
}

async fn echo_until(mut socket: WebSocket, drain: impl std::future::Future<Output = ()>) {
    tokio::pin!(drain);
    loop {
        tokio::select! {
            () = &mut drain => break,
            msg = socket.recv() => match msg {
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                    if socket.send(msg).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let goodbye = CloseFrame {
        code: close_code::AWAY,
        reason: "server going away".into(),
    };
    if socket.send(Message::Close(Some(goodbye))).await.is_err() {
        return;
    }
    // The client's close answers ours; a client that never answers is
    // left after 1 s.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

fn app(supervisor: &Supervisor) -> Router {
    Router::new()
        .route("/", get(|| async { "hello\n" }))
        .route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { format!("{peer}\n") }),
        )
        // `any`: GET for HTTP/1.1, CONNECT for HTTP/2 (RFC 8441).
        .route("/ws", any(ws_echo))
        // Probes: 503 from the first moment of a shutdown delay or drain;
        // liveness 200 throughout.
        .route_service("/ready", supervisor.readiness())
        .route_service("/live", supervisor.liveness())
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
        .with_state(supervisor.clone())
}

/// The command line: where to listen, which server, its connection cap.
struct Options {
    listen: String,
    server_http: bool,
    max_connections: Option<usize>,
    shutdown_delay: Duration,
}

fn options() -> Options {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        listen: "127.0.0.1:8080".to_owned(),
        server_http: false,
        max_connections: None,
        shutdown_delay: Duration::ZERO,
    };
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().as_deref()) {
            ("--listen", Some(addr)) => options.listen = addr.to_owned(),
            ("--server", Some("http")) => options.server_http = true,
            ("--server", Some("axum")) => options.server_http = false,
            ("--max-connections", Some(max)) if max.parse::<usize>().is_ok() => {
                options.max_connections = max.parse().ok();
            }
            ("--shutdown-delay", Some(secs)) if secs.parse::<u64>().is_ok() => {
                options.shutdown_delay = Duration::from_secs(secs.parse().unwrap_or(0));
            }
            _ => {
                eprintln!(
                    "usage: axum [--listen HOST:PORT] [--server axum|http] [--max-connections N] \
                     [--shutdown-delay SECS]"
                );
                std::process::exit(2)
            }
        }
    }
    options
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
    let options = options();
    let listen = &options.listen;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|err| {
        std::io::Error::new(err.kind(), format!("cannot listen on {listen}: {err}"))
    })?;
    println!("listening on {}", listener.local_addr()?);
    let supervisor = Supervisor::new();
    let app = app(&supervisor);
    if options.server_http {
        // `serve::http` gives every request its `ConnectInfo<SocketAddr>`.
        let mut server = tower_exit::serve::http(listener, app, &supervisor);
        if let Some(max) = options.max_connections {
            server = server.max_connections(max);
        }
        return server.grace(Duration::from_secs(10)).with_signals().await;
    }
    tower_exit::serve::graceful(&supervisor, |shutdown| {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
    })
    .grace(Duration::from_secs(10))
    .shutdown_delay(options.shutdown_delay)
    .with_signals()
    .await
}
