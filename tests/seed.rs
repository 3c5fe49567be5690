//! The seed scenario, end to end: a real hyper server whose stack has
//! tower-http's `CatchPanicLayer` and a naive reporter (neither knows about
//! `Exit`) above `ForkGuardLayer`; the handler forks and the child calls
//! `exit(0)`. On both tokio runtimes.

// Each test runs its own runtime on its own thread; a std mutex held across
// awaits is exactly what serialises them.
#![allow(clippy::await_holding_lock)]

mod common;

use bytes::Bytes;
use common::{get, log_with_pid, zombies, PidLog};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::time::Duration;
use tower::{BoxError, ServiceBuilder};
use tower_exit::fork::{self, Forked};
use tower_exit::{Exit, ServiceBuilderExt, Supervisor};

async fn handler(
    log: PathBuf,
    req: Request<tower_exit::serve::http::RequestBody>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let me = std::process::id().to_string();
    if req.uri().path() != "/fork" {
        return Ok(Response::new(Full::from(me)));
    }
    // SAFETY (test): the child appends one line to a file and exits; the
    // guard ends it at the raise.
    match unsafe { fork::fork() }? {
        Forked::Child => {
            log_with_pid(&log, "child");
            tower_exit::exit(0)
        }
        Forked::Parent(mut child) => {
            let status = child.wait().await?;
            log_with_pid(
                &log,
                &format!(
                    "parent-only child-signal={:?}",
                    std::os::unix::process::ExitStatusExt::signal(&status)
                ),
            );
            Ok(Response::new(Full::from(me)))
        }
    }
}

/// The tests here count zombies: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

async fn seed_scenario() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let log = PidLog::new("seed");
    let report_log = log.path.clone();
    let panic_log = log.path.clone();
    let handler_log = log.path.clone();
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        // The naive catch-alls of the seed: every unwind is a crash report
        // and a 500, every error is a report.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            move |_| {
                log_with_pid(&panic_log, "report panic");
                let mut res = Response::new(Full::from("crash"));
                *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                res
            },
        ))
        .map_err(move |err: BoxError| {
            log_with_pid(&report_log, "report error");
            err
        })
        .fork_guard()
        .service_fn(move |req| handler(handler_log.clone(), req));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(tower_exit::serve::http(listener, svc, &supervisor).into_future());
    let parent = std::process::id().to_string();

    let reply = get(addr, "/fork").await.unwrap();
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, parent.as_str())
    );

    // The listener is served by the parent only: every later answer is ours.
    for _ in 0..20 {
        assert_eq!(get(addr, "/pid").await.unwrap().body, parent);
    }

    let lines = log.lines();
    let me = format!("pid={parent}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("child ") && !lines[0].ends_with(&me));
    assert_eq!(lines[1], format!("parent-only child-signal=Some(15) {me}"));
    let child: u32 = lines[0].rsplit_once("pid=").unwrap().1.parse().unwrap();
    assert!(!common::alive(child), "child {child} reaped");
    assert!(zombies().is_empty());

    supervisor.trigger(Exit::success());
    let exit = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), 0);
}

#[test]
fn seed_scenario_on_current_thread_runtime() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(seed_scenario());
}

#[test]
fn seed_scenario_on_multi_thread_runtime() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(seed_scenario());
}

/// The seed scenario a thousand times in a row on one server: the
/// parent-only code runs exactly once per request, every child is reaped.
#[test]
fn seed_scenario_a_thousand_times() {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
            let log = PidLog::new("seed-1000");
            let handler_log = log.path.clone();
            let supervisor = Supervisor::new();
            let svc = ServiceBuilder::new()
                .layer(tower_http::catch_panic::CatchPanicLayer::new())
                .fork_guard()
                .service_fn(move |req| handler(handler_log.clone(), req));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server =
                tokio::spawn(tower_exit::serve::http(listener, svc, &supervisor).into_future());
            let parent = std::process::id().to_string();
            for _ in 0..1000 {
                let reply = get(addr, "/fork").await.unwrap();
                assert_eq!(reply.body, parent);
            }
            let lines = log.lines();
            let parent_only = lines
                .iter()
                .filter(|l| l.starts_with("parent-only child-signal=Some(15) pid="))
                .count();
            let children = lines.iter().filter(|l| l.starts_with("child ")).count();
            assert_eq!((parent_only, children), (1000, 1000));
            assert!(lines
                .iter()
                .filter(|l| l.starts_with("parent-only"))
                .all(|l| l.ends_with(&format!("pid={parent}"))));
            assert!(zombies().is_empty());
            supervisor.trigger(Exit::success());
            assert_eq!(server.await.unwrap().unwrap().code(), 0);
        });
}
