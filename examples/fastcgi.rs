//! The demo app over FastCGI: `cargo run --example fastcgi -- --listen unix:/tmp/app.sock`
//!
//! Same routes as `examples/http.rs`, behind nginx (`fastcgi_pass`) or
//! `cgi-fcgi`. The process exits with the status of the first exit.

mod demo;

use std::process::ExitCode;
use std::time::Duration;
use tower_exit::serve::fastcgi::RequestBody;
use tower_exit::serve::Listener;
use tower_exit::Supervisor;

#[tokio::main]
async fn main() -> std::io::Result<ExitCode> {
    demo::init_logging();
    let listener = Listener::bind(&demo::parse_args("127.0.0.1:9000", false).listen).await?;
    println!("listening on {}", listener.local_addr()?);

    let supervisor = Supervisor::new();
    let service = demo::service::<RequestBody>(&supervisor);
    let exit = tower_exit::serve::fastcgi(listener, service, &supervisor)
        .grace(Duration::from_secs(10))
        .with_signals()
        .await?;
    tracing::info!(%exit, "exiting");
    Ok(exit.into())
}
