//! The demo app over HTTP: `cargo run --example http -- --listen 127.0.0.1:8080`
//!
//! Routes: `/` hello; `/fail` a handler error (reported once, 500);
//! `/panic` (reported once, 500); `/exit/N` (503, not reported, the server
//! drains and the process exits with status N); `/fork` (the child writes a
//! line and exits, the parent answers once); `/slow` (answers after 1 s).
//! SIGTERM or SIGINT drain the server too, status 0.

mod demo;

use std::process::ExitCode;
use std::time::Duration;
use tower_exit::serve::Listener;
use tower_exit::Supervisor;

#[tokio::main]
async fn main() -> std::io::Result<ExitCode> {
    demo::init_logging();
    let listener = Listener::bind(&demo::parse_args("127.0.0.1:8080", false).listen).await?;
    println!("listening on {}", listener.local_addr()?);

    let supervisor = Supervisor::new();
    let exit = tower_exit::serve::http(listener, demo::service(&supervisor), &supervisor)
        .grace(Duration::from_secs(10))
        .with_signals()
        .await?;
    tracing::info!(%exit, "exiting");
    Ok(exit.into())
}
