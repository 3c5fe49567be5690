//! Reporting with tower-exit: real failures reported once, exits per policy.
//!
//! Run: `cargo run --example reporting`
//!
//! The stack is the recommended one: the boundary outermost, then
//! catch-panic, then the reporter *below* it (above it, the reporter would
//! only see the 500 that catch-panic made of a panic). The reporter is the
//! default `TracingReporter` behind a rate limit, with non-zero exits
//! reported as exits (at `WARN`, never as errors). A second reporter shows a
//! closure of your own.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_exit::report::{ExitPolicy, Failure, RateLimited, TracingReporter};
use tower_exit::{ServiceBuilderExt, Supervisor};

async fn handler(req: Request<()>) -> Result<Response<Full<Bytes>>, BoxError> {
    match req.uri().path() {
        "/fail" => Err("database is down".into()),
        "/panic" => panic!("bug in handler"),
        "/exit" => tower_exit::exit(3),
        _ => Ok(Response::new(Full::from("hello"))),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_target(false)
        .without_time()
        .init();
    // The panic hook prints panics on its own; the reporter is enough here.
    std::panic::set_hook(Box::new(|_| {}));

    // A reporter of your own: any `Fn(&Failure<'_>)`.
    let failures = Arc::new(AtomicUsize::new(0));
    let count = failures.clone();
    let count_failures = move |failure: &Failure<'_>| {
        if failure.is_failure() {
            count.fetch_add(1, Ordering::SeqCst);
        }
    };

    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        // The exit-aware stack, its reporter rate-limited and told about
        // exits with a non-zero code too...
        .layer(
            supervisor
                .stack()
                .report(RateLimited::new(TracingReporter, 10, 20))
                .report_exits(ExitPolicy::NonZero),
        )
        // ... and one of its parts alone, below it: a second reporter.
        .report(count_failures)
        .service_fn(handler);

    for path in ["/", "/fail", "/panic", "/exit"] {
        let outcome = svc
            .clone()
            .oneshot(Request::get(path).body(()).unwrap())
            .await;
        match outcome {
            Ok(res) => println!("{path:7} -> {}", res.status()),
            Err(err) => println!("{path:7} -> error passed on: {err}"),
        }
    }
    println!(
        "real failures counted by the closure: {}; exit recorded by the boundary: {:?}",
        failures.load(Ordering::SeqCst),
        supervisor.exit()
    );
}
