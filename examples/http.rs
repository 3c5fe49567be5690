//! The demo app over HTTP: `cargo run --example http -- --listen 127.0.0.1:8080`
//!
//! Routes: `/` hello; `/fail` a handler error (reported once, 500);
//! `/panic` (reported once, 500); `/exit/N` (503, not reported, the server
//! drains and the process exits with status N); `/fork` (the child writes a
//! line and exits, the parent answers once); `/slow` (answers after 1 s);
//! `POST /upload` (reads the body, answers its length; `400` when the
//! client sends slower than the minimum request body rate).
//! SIGTERM or SIGINT drain the server too, status 0. `--header-timeout SECS`,
//! `--max-connections N` and `--min-request-body-rate B/SECS` set those
//! limits (defaults 30 s, half of `ulimit -n`, 240/5).

mod demo;

use std::process::ExitCode;
use std::time::Duration;
use tower_exit::{Exit, Supervisor};

#[tokio::main]
async fn main() -> ExitCode {
    demo::init_logging();
    demo::finish(run().await)
}

async fn run() -> std::io::Result<Exit> {
    let args = demo::parse_args("127.0.0.1:8080", false);
    let listener = demo::bind(&args).await?;
    println!("listening on {}", listener.local_addr()?);

    let supervisor = Supervisor::new();
    let mut serve = tower_exit::serve::http(listener, demo::service(&supervisor), &supervisor)
        .grace(Duration::from_secs(10))
        .shutdown_delay(args.shutdown_delay)
        .with_signals();
    if let Some(timeout) = args.header_timeout {
        serve = serve.header_read_timeout(timeout);
    }
    if let Some(max) = args.max_connections {
        serve = serve.max_connections(max);
    }
    if let Some((bytes_per_sec, grace)) = args.min_response_rate {
        serve = serve.min_response_rate(bytes_per_sec, grace);
    }
    if let Some((bytes_per_sec, grace)) = args.min_request_body_rate {
        serve = serve.min_request_body_rate(bytes_per_sec, grace);
    }
    serve.await
}
