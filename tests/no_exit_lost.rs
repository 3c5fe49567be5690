//! No exit is lost and no exit is silent.
//!
//! - An exit that escapes the service (no boundary) ends `serve::http`
//!   (HTTP/1 and HTTP/2) and `serve::fastcgi` with its code, logged at
//!   ERROR, while a request in flight is still answered.
//! - An exit raised where nothing exit-aware catches it is logged once at
//!   ERROR with its code, message and location; `exit::spawn` and
//!   `exit::main` are the ways not to be flagged; a detached
//!   `exit::spawn` task's exit is logged, not dropped.
//!
//! Tests that capture logs run on a current-thread runtime: the capture is
//! per thread.

mod common;

use common::logs::{capture, Logs};
use common::{get, get_h2, handler, EXIT_ROUTES};
use http::StatusCode;
use std::future::IntoFuture;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Command, ExitCode};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;
use tower_exit::{exit, Exit, ServiceBuilderExt, Supervisor};

const ESCAPED: &str = "exit escaped the service";
const UNHANDLED: &str = "nothing exit-aware catches it";

fn escaped_events(logs: &Logs, code: i32) -> usize {
    logs.with_message(ESCAPED)
        .iter()
        .filter(|e| e.level == tracing::Level::ERROR)
        .filter(|e| e.get("exit.code") == Some(&code.to_string()))
        .count()
}

#[tokio::test(flavor = "current_thread")]
async fn an_exit_escaping_the_service_ends_the_http_server_with_its_code() {
    for http2 in [false, true] {
        for path in EXIT_ROUTES {
            let (logs, _guard) = capture();
            let supervisor = Supervisor::new();
            // No boundary: nothing in the stack is exit-aware.
            let svc = ServiceBuilder::new().service_fn(handler);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(
                tower_exit::serve::http(listener, svc, &supervisor)
                    .grace(Duration::from_secs(5))
                    .into_future(),
            );
            let fetch = |path: &'static str| async move {
                if http2 {
                    get_h2(addr, path).await
                } else {
                    get(addr, path).await
                }
            };
            assert_eq!(fetch("/ok").await.unwrap().status, StatusCode::OK);
            let slow = tokio::spawn(fetch("/slow"));
            tokio::time::sleep(Duration::from_millis(50)).await;

            let exited = fetch(path).await.unwrap();
            assert_eq!(exited.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
            if !http2 {
                assert_eq!(exited.headers["connection"], "close", "{path}");
            }
            let slow = slow.await.unwrap().unwrap();
            assert_eq!((slow.status, slow.body.as_str()), (StatusCode::OK, "slow"));

            let exit = tokio::time::timeout(Duration::from_secs(5), server)
                .await
                .expect("server drains")
                .unwrap()
                .unwrap();
            assert_eq!(exit.code(), 3, "{path} http2={http2}");
            assert!(fetch("/ok").await.is_err(), "no longer accepting");
            assert_eq!(escaped_events(&logs, 3), 1, "{path} http2={http2}");
            // Caught by the server: not also flagged as unhandled (the
            // `/spawn` route raises in a plain `tokio::spawn` task, which is).
            if !path.starts_with("/spawn") && !path.starts_with("/blocking") {
                assert!(logs.with_message(UNHANDLED).is_empty(), "{path}");
            }
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_exit_escaping_the_service_ends_the_fastcgi_server_with_its_code() {
    use common::fcgi::{read_until_end, request, response_of};
    for path in EXIT_ROUTES {
        let (logs, _guard) = capture();
        let supervisor = Supervisor::new();
        let svc = ServiceBuilder::new().service_fn(handler);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tower_exit::serve::fastcgi(listener, svc, &supervisor)
                .grace(Duration::from_secs(5))
                .into_future(),
        );
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(&request(1, false, "/slow", b""))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;

        let mut exiting = TcpStream::connect(addr).await.unwrap();
        exiting
            .write_all(&request(1, false, path, b""))
            .await
            .unwrap();
        let recs = read_until_end(&mut exiting, &[1]).await;
        let (stdout, end) = response_of(&recs, 1);
        assert!(stdout.starts_with("Status: 503"), "{path}: {stdout}");
        assert_eq!(end, Some(0), "{path}: request complete");

        let recs = read_until_end(&mut slow, &[1]).await;
        let (stdout, end) = response_of(&recs, 1);
        assert!(stdout.starts_with("Status: 200"), "{path}: {stdout}");
        assert!(stdout.ends_with("slow"), "{path}: {stdout}");
        assert_eq!(end, Some(0));

        let exit = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server drains")
            .unwrap()
            .unwrap();
        assert_eq!(exit.code(), 3, "{path}");
        assert_eq!(escaped_events(&logs, 3), 1, "{path}");
    }
}

#[test]
fn an_exit_raised_where_nothing_catches_it_is_logged_once_with_where() {
    let (logs, _guard) = capture();
    let line = line!() + 2;
    let payload =
        catch_unwind(|| Exit::new(4).with_message("bye").raise()).expect_err("it unwinds");
    assert_eq!(Exit::from_panic(&*payload).map(Exit::code), Some(4));

    let events = logs.with_message(UNHANDLED);
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(event.level, tracing::Level::ERROR);
    assert_eq!(event.get("exit.code"), Some("4"));
    assert_eq!(event.get("exit.message"), Some("bye"));
    let at = event.get("at").unwrap();
    assert!(
        at.starts_with(&format!("tests/no_exit_lost.rs:{line}:")),
        "{at}"
    );
    // Each field once.
    let mut names: Vec<_> = event.fields.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), event.fields.len(), "{event:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn an_exit_under_a_boundary_is_not_flagged() {
    let (logs, _guard) = capture();
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        .boundary(&supervisor)
        .catch_panic()
        .service_fn(handler);
    let res = tower::ServiceExt::oneshot(svc, http::Request::get("/nested/6").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(supervisor.exit().map(|e| e.code()), Some(6));
    assert!(logs.with_message(UNHANDLED).is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn exit_spawn_carries_the_exit_to_join_without_flagging_it() {
    let (logs, _guard) = capture();
    let supervisor = Supervisor::new();
    let svc =
        ServiceBuilder::new()
            .boundary(&supervisor)
            .service_fn(|_: http::Request<()>| async {
                let task = exit::spawn(async {
                    tokio::task::yield_now().await;
                    tower_exit::exit(7)
                });
                exit::join(task).await.map_err(|f| format!("{f:?}"))?;
                Ok::<_, tower::BoxError>(http::Response::new(String::new()))
            });
    let res = tower::ServiceExt::oneshot(svc, http::Request::new(()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(supervisor.exit().map(|e| e.code()), Some(7));
    assert!(
        logs.with_message(UNHANDLED).is_empty(),
        "{:?}",
        logs.events()
    );

    // The control: the same exit in a plain `tokio::spawn` task is flagged,
    // once, where it was raised.
    let plain = tokio::spawn(async { tower_exit::exit(8) });
    let err = plain.await.unwrap_err();
    assert_eq!(exit::classify_join(err).exit().map(Exit::code), Some(8));
    assert_eq!(logs.with_message(UNHANDLED).len(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_detached_exit_spawn_task_logs_its_exit_whichever_ends_first() {
    let (logs, _guard) = capture();
    let detached = "handle was dropped";

    // The handle is dropped first, then the task exits.
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let task = exit::spawn(async move {
        let _ = wait.await;
        tower_exit::exit(9)
    });
    drop(task);
    go.send(()).unwrap();
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let events = logs.with_message(detached);
    assert_eq!(events.len(), 1, "{:?}", logs.events());
    assert_eq!(events[0].get("exit.code"), Some("9"));

    // The task exits first, then the handle is dropped unjoined.
    let task = exit::spawn(async { tower_exit::exit(10) });
    while !task.is_finished() {
        tokio::task::yield_now().await;
    }
    drop(task);
    let events = logs.with_message(detached);
    assert_eq!(events.len(), 2, "{:?}", logs.events());
    assert_eq!(events[1].get("exit.code"), Some("10"));

    // Joined: nothing to say.
    let task = exit::spawn(async { tower_exit::exit(11) });
    assert!(task.await.is_err());
    assert_eq!(logs.with_message(detached).len(), 2);
    assert!(
        logs.with_message(UNHANDLED).is_empty(),
        "{:?}",
        logs.events()
    );
}

#[test]
fn exit_main_ends_with_the_exit_status_and_passes_values_through() {
    let (logs, _guard) = capture();
    let code = exit::main(|| -> ExitCode { tower_exit::exit(3) });
    assert_eq!(format!("{code:?}"), format!("{:?}", ExitCode::from(3)));
    let code = exit::main(|| ExitCode::from(4));
    assert_eq!(format!("{code:?}"), format!("{:?}", ExitCode::from(4)));
    let code = exit::main(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async { tower_exit::exit(300) })
    });
    assert_eq!(format!("{code:?}"), format!("{:?}", ExitCode::from(44)));
    assert!(logs.with_message(UNHANDLED).is_empty());
    // A real panic is not an exit: it unwinds on.
    let panicked = catch_unwind(AssertUnwindSafe(|| exit::main(|| -> () { panic!("bug") })));
    assert!(panicked.is_err());
}

/// Run as a separate process by the test below: `main`'s body raising an
/// exit with no subscriber installed and no `exit::main`.
#[test]
fn raised_in_a_bare_main() {
    if std::env::var_os("TOWER_EXIT_BARE_MAIN").is_none() {
        return; // only meaningful as the child of the test below
    }
    tower_exit::exit(3)
}

#[test]
fn an_exit_raised_in_a_bare_main_is_said_on_stderr_when_no_subscriber_listens() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "raised_in_a_bare_main",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TOWER_EXIT_BARE_MAIN", "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tower-exit: exit 3 at tests/no_exit_lost.rs:"),
        "{stderr}"
    );
    assert!(stderr.contains(UNHANDLED), "{stderr}");
}

/// A forked child of a test: `exit::main` around a body that raises,
/// through a real process boundary, with its message on stderr.
#[test]
fn exit_main_prints_the_message_as_python_does() {
    if std::env::var_os("TOWER_EXIT_MAIN_CHILD").is_some() {
        let code = exit::main(|| -> () { Exit::failure("config missing").raise() });
        // `ExitCode` ends a process only when returned from `main`; the
        // test harness's own `main` cannot, so compare and report.
        let expected = format!("{:?}", ExitCode::from(1));
        std::process::exit(if format!("{code:?}") == expected {
            42
        } else {
            0
        });
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "exit_main_prints_the_message_as_python_does",
            "--nocapture",
        ])
        .env("TOWER_EXIT_MAIN_CHILD", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(42));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().any(|l| l == "config missing"), "{stderr}");
}

/// The body of the test below, run in a process of its own: a handler under
/// a boundary without a fork guard forks, and the child raises `exit(0)`.
#[cfg(feature = "fork")]
#[tokio::test]
async fn forked_under_a_boundary_without_a_guard() {
    if std::env::var_os("TOWER_EXIT_UNGUARDED_CHILD").is_none() {
        return; // only meaningful as the child of the test below
    }
    use tower::ServiceExt;
    use tower_exit::fork::{fork, Forked};
    let parent = std::process::id();
    let supervisor = Supervisor::new();
    let svc =
        ServiceBuilder::new()
            .boundary(&supervisor)
            .service_fn(|_: http::Request<()>| async {
                // SAFETY (test): a single-threaded test runtime; the child
                // raises an exit, which the boundary's copy in the child takes.
                match unsafe { fork() }? {
                    Forked::Child => tower_exit::exit(0),
                    Forked::Parent(mut child) => {
                        child.wait().await?;
                        Ok::<_, tower::BoxError>(http::Response::new(String::new()))
                    }
                }
            });
    let _ = svc.oneshot(http::Request::new(())).await;
    if std::process::id() != parent {
        // The child ran on into this test's code: end it here.
        std::process::exit(0);
    }
}

#[cfg(feature = "fork")]
#[test]
fn an_exit_in_a_child_forked_under_a_boundary_without_a_guard_is_said_at_the_raise() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "forked_under_a_boundary_without_a_guard",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TOWER_EXIT_UNGUARDED_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("child forked below an exit-aware frame with no fork guard"))
        .collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert!(
        said[0].contains("tower-exit: exit 0 at tests/no_exit_lost.rs:"),
        "{stderr}"
    );
}

/// Where a handler under the stack runs other executors' tasks: a
/// `LocalSet`'s, or a nested runtime's under `block_in_place`. An exit
/// raised in one of their tasks never reaches the stack (that executor
/// catches it); with the task's handle dropped, it is said at the raise.
async fn other_executor(req: http::Request<()>) -> Result<http::Response<String>, tower::BoxError> {
    match req.uri().path() {
        "/local-set" => {
            let local = tokio::task::LocalSet::new();
            local
                .run_until(async {
                    drop(tokio::task::spawn_local(async { exit(3) }));
                    tokio::task::yield_now().await;
                    tokio::task::yield_now().await;
                })
                .await;
        }
        "/nested-runtime" => tokio::task::block_in_place(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            runtime.block_on(async {
                drop(tokio::spawn(async { exit(4) }));
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
            });
        }),
        // Not another executor: `Handle::block_on` polls this future on
        // the handler's own frames, so the stack takes the exit.
        "/handle-block-on" => tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async { exit(5) })
        }),
        _ => {}
    }
    Ok(http::Response::new(String::new()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn exits_in_other_executors_tasks_are_said_at_the_raise() {
    for (path, code) in [("/local-set", "3"), ("/nested-runtime", "4")] {
        let (logs, _guard) = capture();
        let supervisor = Supervisor::new();
        let svc = ServiceBuilder::new()
            .layer(supervisor.stack())
            .service_fn(other_executor);
        let res = tower::ServiceExt::oneshot(svc, http::Request::get(path).body(()).unwrap())
            .await
            .unwrap();
        // That executor caught the exit: the handler answered.
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let said = logs.with_message(UNHANDLED);
        assert_eq!(said.len(), 1, "{path}: {said:?}");
        assert_eq!(said[0].get("exit.code"), Some(code), "{path}");
        assert!(
            said[0]
                .get("at")
                .unwrap()
                .starts_with("tests/no_exit_lost.rs:"),
            "{path}"
        );
    }
    // The control: an exit raised on the handler's own frames is taken by
    // the stack, and not said as unhandled.
    let (logs, _guard) = capture();
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        .layer(supervisor.stack())
        .service_fn(other_executor);
    let res = tower::ServiceExt::oneshot(
        svc,
        http::Request::get("/handle-block-on").body(()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(supervisor.exit().map(|e| e.code()), Some(5));
    assert!(logs.with_message(UNHANDLED).is_empty());
}
