//! The demo app over FastCGI: `cargo run --example fastcgi -- --listen unix:/tmp/app.sock`
//!
//! Same routes as `examples/http.rs`, behind nginx (`fastcgi_pass`) or
//! `cgi-fcgi`. The process exits with the status of the first exit.

mod demo;

use std::process::ExitCode;
use std::time::Duration;
use tower_exit::serve::fastcgi::{Limits, RequestBody};
use tower_exit::{Exit, Supervisor};

#[tokio::main]
async fn main() -> ExitCode {
    demo::init_logging();
    demo::finish(run().await)
}

async fn run() -> std::io::Result<Exit> {
    let args = demo::parse_args("127.0.0.1:9000", false);
    let listener = demo::bind(&args).await?;
    println!("listening on {}", listener.local_addr()?);

    // `--header-timeout` bounds the first request and request input here;
    // `--max-connections` the connections.
    let mut limits = Limits::default();
    if let Some(timeout) = args.header_timeout {
        limits.begin_timeout = timeout;
        limits.read_timeout = timeout;
    }
    if let Some(max) = args.max_connections {
        limits.max_conns = max;
    }
    let supervisor = Supervisor::new();
    let service = demo::service::<RequestBody>(&supervisor);
    tower_exit::serve::fastcgi(listener, service, &supervisor)
        .limits(limits)
        .grace(Duration::from_secs(10))
        .shutdown_delay(args.shutdown_delay)
        .with_signals()
        .await
}
