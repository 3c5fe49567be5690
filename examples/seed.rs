//! The seed scenario in Rust, side by side: the same handlers behind a naive
//! catch-all stack and behind tower-exit's layers.
//!
//! Run: `cargo run --example seed`
//!
//! 1. A handler ends the work on purpose with `exit(0)`.
//!    - naive: tower-http's catch-panic answers 500 and the reporter files a
//!      crash report for a non-error;
//!    - tower-exit: no report, the boundary answers 503 and records exit 0
//!      for `main`.
//! 2. A handler forks; the child calls `exit(0)`.
//!    - naive: the catch-all swallows the child's exit and the child runs on
//!      into the parent's code: "code runs double";
//!    - tower-exit, behind a real hyper server: `ForkGuardLayer` ends the
//!      child (SIGTERM, after its cleanups) before the catch-all above sees
//!      it; the parent's code runs once and only the parent serves the
//!      listener.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use std::future::IntoFuture;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_exit::fork::{self, Forked};
use tower_exit::report::Failure;
use tower_exit::{ServiceBuilderExt, Supervisor};

type Res = Response<Full<Bytes>>;

/// Ends the work on purpose.
async fn done(_: Request<()>) -> Result<Res, BoxError> {
    tower_exit::exit(0)
}

/// Forks; the child does its part and exits, the parent answers.
async fn forking<B>(_: Request<B>) -> Result<Res, BoxError> {
    // SAFETY: the child prints one line and raises an exit, which the
    // guard turns into the end of the child without unwinding.
    match unsafe { fork::fork() }? {
        Forked::Child => {
            println!(
                "    child  {}: my work is done, exit(0)",
                std::process::id()
            );
            tower_exit::exit(0)
        }
        Forked::Parent(mut child) => {
            let status = child.wait().await?;
            println!(
                "    parent {}: child {} ended (status {:?}, signal {:?})",
                std::process::id(),
                child.pid(),
                status.code(),
                status.signal()
            );
            Ok(Response::new(Full::from("forked")))
        }
    }
}

/// A catch-all of the seed's kind: every unwind is a crash, reported and
/// answered with a 500.
fn naive_catch_all(
    reports: Arc<AtomicUsize>,
) -> tower_http::catch_panic::CatchPanicLayer<
    impl Fn(Box<dyn std::any::Any + Send>) -> Response<Full<Bytes>> + Clone,
> {
    tower_http::catch_panic::CatchPanicLayer::custom(move |_| {
        reports.fetch_add(1, Ordering::SeqCst);
        println!(
            "    [naive reporter in {}] crash report sent",
            std::process::id()
        );
        let mut res = Response::new(Full::from("crash"));
        *res.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        res
    })
}

async fn part_one() -> Option<tower_exit::Exit> {
    println!("1. a handler calls exit(0)");

    let reports = Arc::new(AtomicUsize::new(0));
    let naive = ServiceBuilder::new()
        .layer(naive_catch_all(reports.clone()))
        .service_fn(done);
    let res = naive.oneshot(Request::new(())).await.unwrap();
    println!(
        "  naive:     status {}, {} report(s), exit code seen: none",
        res.status(),
        reports.load(Ordering::SeqCst)
    );

    let reports = Arc::new(AtomicUsize::new(0));
    let counter = reports.clone();
    let supervisor = Supervisor::new();
    let aware = ServiceBuilder::new()
        .layer(supervisor.stack().report(move |_: &Failure<'_>| {
            counter.fetch_add(1, Ordering::SeqCst);
        }))
        .service_fn(done);
    let res = aware.oneshot(Request::new(())).await.unwrap();
    let exit = supervisor.exit();
    println!(
        "  tower-exit: status {}, {} report(s), exit code seen: {:?}",
        res.status(),
        reports.load(Ordering::SeqCst),
        exit.as_ref().map(tower_exit::Exit::code)
    );
    exit
}

async fn part_two(original: u32) {
    println!("2. a handler forks and the child calls exit(0)");

    println!("  naive:");
    let reports = Arc::new(AtomicUsize::new(0));
    let naive = ServiceBuilder::new()
        .layer(naive_catch_all(reports))
        .service_fn(forking);
    let res = naive.oneshot(Request::new(())).await.unwrap();
    println!(
        "    [{}] parent-only code: commit, answer {}",
        std::process::id(),
        res.status()
    );
    if std::process::id() != original {
        // The child got here: code ran double. End it, or it would go on
        // running the rest of this program.
        println!("    ^ the child ran the parent's code: code runs double");
        std::process::exit(0);
    }

    println!("  tower-exit (ForkGuardLayer below the same naive catch-all, real hyper server):");
    let reports = Arc::new(AtomicUsize::new(0));
    let supervisor = Supervisor::new();
    let guarded = ServiceBuilder::new()
        .layer(naive_catch_all(reports.clone()))
        .fork_guard()
        .service_fn(
            |req: Request<tower_exit::serve::http::RequestBody>| async move {
                if req.uri().path() == "/fork" {
                    forking(req).await
                } else {
                    Ok(Response::new(Full::from(std::process::id().to_string())))
                }
            },
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server =
        tokio::spawn(tower_exit::serve::http(listener, guarded, &supervisor).into_future());

    let (status, _) = get(addr, "/fork").await;
    println!(
        "    [{}] parent-only code: commit, answer {status}",
        std::process::id()
    );
    let mut answered_by = Vec::new();
    for _ in 0..5 {
        answered_by.push(get(addr, "/pid").await.1);
    }
    println!(
        "    5 more requests answered by pid(s) {answered_by:?}; crash reports: {}",
        reports.load(Ordering::SeqCst)
    );
    supervisor.trigger(tower_exit::Exit::success());
    let _ = server.await;
}

/// One GET over a fresh connection: (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (http::StatusCode, String) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "localhost")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let res = sender.send_request(req).await.expect("response");
    let status = res.status();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn main() -> ExitCode {
    let original = std::process::id();
    // One thread: after the naive fork the child can still finish its
    // request on this runtime and show what it runs into.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let exit = runtime.block_on(async {
        let exit = part_one().await;
        println!();
        part_two(original).await;
        exit
    });
    println!();
    println!("main returns the recorded exit: {exit:?}");
    exit.map_or(ExitCode::FAILURE, ExitCode::from)
}
