//! `fork::spawn`, `Child`, child cleanup hooks and the `ForkGuardLayer`,
//! with real forks. Tests here run one at a time: zombie counts are
//! process-wide.

// Each test runs its own runtime on its own thread; a std mutex held across
// awaits is exactly what serialises them.
#![allow(clippy::await_holding_lock)]

mod common;

use bytes::Bytes;
use common::{become_subreaper, zombies, PidLog};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_exit::fork::{self, Forked};
use tower_exit::report::Failure;
use tower_exit::{Exit, ForkGuardLayer, ServiceBuilderExt, Supervisor};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    become_subreaper();
    guard
}

/// Where the cleanup hooks of this test binary write; set per test.
static HOOK_LOG: Mutex<Option<PathBuf>> = Mutex::new(None);

fn register_hooks_once() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        for name in ["hook-1", "failing", "hook-2"] {
            fork::on_child_exit(move || {
                // The lock is only held by the test thread while it sets the
                // path, never across a fork, so `try_lock` succeeds here.
                let Some(path) = HOOK_LOG.try_lock().ok().and_then(|p| p.clone()) else {
                    return;
                };
                if name == "failing" {
                    panic!("a failing hook does not stop the others");
                }
                common::log_line(&path, &format!("{name} pid={}", std::process::id()));
            });
        }
    });
}

fn hooks_into(log: &PidLog) {
    register_hooks_once();
    *HOOK_LOG.lock().unwrap() = Some(log.path.clone());
}

/// The hook lines a child wrote: must be exactly hook-1 then hook-2.
fn hook_lines_of(log: &PidLog, pid: u32) -> Vec<String> {
    log.lines()
        .into_iter()
        .filter(|l| l.starts_with("hook") && l.ends_with(&format!("pid={pid}")))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn spawn_maps_the_childs_outcome_to_its_status_and_runs_hooks_once_in_order() {
    let _serial = serial();
    let log = PidLog::new("spawn");
    hooks_into(&log);
    let cases: [(fn(), i32); 5] = [
        (|| {}, 0),
        (|| tower_exit::exit(7), 7),
        (|| Exit::failure("no").raise(), 1),
        (|| panic!("child bug"), 101),
        (|| std::panic::resume_unwind(Box::new(Exit::new(300))), 44),
    ];
    for (work, status) in cases {
        let mut child = fork::spawn(work).unwrap();
        let pid = child.pid();
        assert_eq!(child.wait().await.unwrap().code(), Some(status));
        assert_eq!(hook_lines_of(&log, pid), ["hook-1", "hook-2"]);
    }
    assert!(zombies().is_empty());
}

#[tokio::test]
async fn a_child_handle_inherited_through_a_fork_refuses_to_signal() {
    let _serial = serial();
    let mut first = fork::spawn(|| std::thread::sleep(Duration::from_secs(30))).unwrap();
    // A later child holds a copy of `first`'s handle: it is not the owner,
    // and in it the pid may already name another process.
    let mut second = fork::spawn(|| {
        let refused = first.kill(libc::SIGKILL).map_err(|e| e.kind());
        let status = if refused == Err(std::io::ErrorKind::PermissionDenied) {
            0
        } else {
            1
        };
        tower_exit::exit(status)
    })
    .unwrap();
    assert_eq!(second.wait().await.unwrap().code(), Some(0));
    assert!(first.try_wait().unwrap().is_none(), "first still runs");
    first.kill(libc::SIGKILL).unwrap();
    assert_eq!(first.wait().await.unwrap().signal(), Some(libc::SIGKILL));
}

#[tokio::test]
async fn child_handle_can_poll_kill_and_is_reaped_when_dropped() {
    let _serial = serial();
    let mut child = fork::spawn(|| std::thread::sleep(Duration::from_secs(30))).unwrap();
    assert!(child.try_wait().unwrap().is_none());
    child.kill(libc::SIGKILL).unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(
        child.kill(libc::SIGTERM).is_err(),
        "reaped: no signal to a reused pid"
    );

    // Dropped while running: the shared reaper collects it once it ends.
    let child = fork::spawn(|| std::thread::sleep(Duration::from_millis(100))).unwrap();
    let pid = child.pid();
    drop(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while common::alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "dropped child {pid} never reaped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(zombies().is_empty());
}

/// What the child does after forking inside a handler.
#[derive(Clone, Copy, Debug)]
enum InChild {
    Exit,
    Error,
    /// `Err` of an error whose source is `Exit::new(6)`.
    NestedExit,
    Panic,
    Respond,
    Await,
    OwnSigtermHandler,
    IgnoreSigterm,
    ForkAgain,
    /// Holds an RAII guard (a transaction, say) and exits with 5.
    ExitHoldingTransaction,
}

/// Rolls back on drop, as an RAII transaction does; logs where it ran.
struct Transaction<'a>(&'a (dyn Fn(&str) + Sync));

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        (self.0)("rolled-back");
    }
}

impl InChild {
    async fn run(self, log: &(dyn Fn(&str) + Sync)) -> Result<Response<Full<Bytes>>, BoxError> {
        match self {
            InChild::Exit => tower_exit::exit(0),
            InChild::Error => Err("child error".into()),
            InChild::NestedExit => Err(std::io::Error::other(tower_exit::Exit::new(6)).into()),
            InChild::Panic => panic!("child panics"),
            InChild::Respond => Ok(Response::new(Full::from("from child"))),
            InChild::Await => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(Response::new(Full::from("child awaited")))
            }
            InChild::OwnSigtermHandler => {
                extern "C" fn keep_running(_: libc::c_int) {}
                // SAFETY: test code: the application's own handler, which
                // must not keep the child alive.
                unsafe {
                    libc::signal(
                        libc::SIGTERM,
                        keep_running as *const () as libc::sighandler_t,
                    )
                };
                tower_exit::exit(0)
            }
            InChild::IgnoreSigterm => {
                // SAFETY: as above, with the signal ignored.
                unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
                tower_exit::exit(0)
            }
            // SAFETY (test): the grandchild logs (a file append) and exits.
            InChild::ForkAgain => match unsafe { fork::fork() }? {
                Forked::Child => {
                    log("grandchild");
                    tower_exit::exit(0)
                }
                Forked::Parent(mut grandchild) => {
                    let status = grandchild.wait_blocking()?;
                    log(&format!("grandchild-status {:?}", status.signal()));
                    tower_exit::exit(0)
                }
            },
            InChild::ExitHoldingTransaction => {
                let _tx = Transaction(log);
                tower_exit::exit(5)
            }
        }
    }
}

type Reply = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>,
>;

/// The handler: forks, then does `in_child` in the child; the parent waits
/// for the child and answers with its status.
fn forking_handler(log: &PidLog, in_child: InChild) -> impl Fn(Request<()>) -> Reply + Clone {
    let path = log.path.clone();
    move |_: Request<()>| {
        let path = path.clone();
        Box::pin(async move {
            let log = move |line: &str| common::log_with_pid(&path, line);
            // SAFETY (test): single-threaded runtime; the child does what
            // `in_child` says and is ended by the guard.
            match unsafe { fork::fork() }? {
                Forked::Child => {
                    log("child");
                    in_child.run(&log).await
                }
                Forked::Parent(mut child) => {
                    let status = child.wait().await?;
                    log("parent-only");
                    Ok(Response::new(Full::from(format!(
                        "{:?} {:?}",
                        status.code(),
                        status.signal()
                    ))))
                }
            }
        })
    }
}

/// A naive catch-all above the guard: answers every unwind with a 500 and
/// logs the errors it sees, as the seed's framework did.
async fn fork_request(
    log: &PidLog,
    guard: ForkGuardLayer<tower_exit::exit::BoxedError>,
    in_child: InChild,
) -> Response<String> {
    let path = log.path.clone();
    let svc = ServiceBuilder::new()
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .map_err(move |err: BoxError| {
            common::log_line(&path, &format!("caught error pid={}", std::process::id()));
            err
        })
        .layer(guard)
        .service_fn(forking_handler(log, in_child));
    let res = svc.oneshot(Request::new(())).await.expect("parent answers");
    log.log("after-request");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, String::from_utf8_lossy(&body).into_owned())
}

/// The problem the guard solves, shown: without it, the child's `exit(0)`
/// unwinds into a catch-all, which answers 500 in the child, and the child
/// runs the code after the request: code runs double.
#[tokio::test]
async fn without_a_guard_the_child_runs_on_into_the_parents_code() {
    let _serial = serial();
    let log = PidLog::new("unguarded");
    let parent = std::process::id();
    let svc = ServiceBuilder::new()
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .service_fn(forking_handler(&log, InChild::Exit));
    let res = svc.oneshot(Request::new(())).await.expect("answers");
    log.log(&format!("after-request {}", res.status().as_u16()));
    if std::process::id() != parent {
        // The child, which just ran the parent's code: end it here.
        // SAFETY: `_exit` ends this forked test child at once.
        unsafe { libc::_exit(0) };
    }
    let lines = log.lines();
    let after: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("after-request"))
        .collect();
    assert_eq!(after.len(), 2, "{lines:?}");
    assert!(
        after
            .iter()
            .any(|l| l.starts_with("after-request 500 pid=")
                && !l.ends_with(&format!("pid={parent}")))
    );
    assert!(after.contains(&&format!("after-request 200 pid={parent}")));
    assert!(zombies().is_empty());
}

#[tokio::test]
async fn guard_ends_the_child_whatever_its_outcome_and_the_parent_runs_on_once() {
    let _serial = serial();
    for in_child in [
        InChild::Exit,
        InChild::Error,
        InChild::NestedExit,
        InChild::Panic,
        InChild::Respond,
        InChild::Await,
        InChild::OwnSigtermHandler,
        InChild::IgnoreSigterm,
    ] {
        for (guard, expected) in [
            (ForkGuardLayer::new(), "None Some(15)".to_owned()),
            (
                ForkGuardLayer::new().exit_code(),
                match in_child {
                    InChild::Error | InChild::Await => "Some(1) None",
                    // An exit anywhere in the error's chain gives its status.
                    InChild::NestedExit => "Some(6) None",
                    InChild::Panic => "Some(101) None",
                    _ => "Some(0) None",
                }
                .to_owned(),
            ),
        ] {
            let log = PidLog::new("guard");
            hooks_into(&log);
            let res = fork_request(&log, guard, in_child).await;
            assert_eq!(res.body(), &expected, "{in_child:?}");
            let me = format!("pid={}", std::process::id());
            let lines = log.lines();
            let child_pid = lines
                .iter()
                .find(|l| l.starts_with("child "))
                .and_then(|l| l.rsplit_once("pid="))
                .map(|(_, p)| p.parse::<u32>().unwrap())
                .expect("child ran");
            // Parent-only code ran exactly once, in the parent; nothing of
            // the child reached the catch-all or the code after the request.
            let parent_lines: Vec<_> = lines.iter().filter(|l| !l.starts_with("hook")).collect();
            assert_eq!(
                parent_lines,
                [
                    &format!("child pid={child_pid}"),
                    &format!("parent-only {me}"),
                    &format!("after-request {me}"),
                ],
                "{in_child:?}"
            );
            assert_eq!(hook_lines_of(&log, child_pid), ["hook-1", "hook-2"]);
        }
    }
    assert!(zombies().is_empty());
}

#[tokio::test]
async fn a_child_that_forks_again_is_guarded_at_every_level() {
    let _serial = serial();
    let log = PidLog::new("nested");
    hooks_into(&log);
    let res = fork_request(&log, ForkGuardLayer::new(), InChild::ForkAgain).await;
    assert_eq!(res.body(), "None Some(15)");
    let lines = log.lines();
    let count = |prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(count("child "), 1);
    assert_eq!(count("grandchild "), 1);
    assert_eq!(count("grandchild-status Some(15)"), 1, "{lines:?}");
    assert_eq!(count("parent-only"), 1);
    assert_eq!(count("after-request"), 1);
    assert_eq!(count("caught"), 0);
    assert!(
        zombies().is_empty(),
        "no orphan came back to us as a zombie"
    );
}

#[tokio::test]
async fn a_thousand_fork_and_exit_requests_leave_no_zombie() {
    let _serial = serial();
    let log = PidLog::new("thousand");
    *HOOK_LOG.lock().unwrap() = None;
    for _ in 0..1000 {
        let res = fork_request(&log, ForkGuardLayer::new(), InChild::Exit).await;
        assert_eq!(res.body(), "None Some(15)");
    }
    let lines = log.lines();
    let me = format!("pid={}", std::process::id());
    let parent_only = lines
        .iter()
        .filter(|l| l.starts_with("parent-only"))
        .count();
    let all_in_parent = lines
        .iter()
        .filter(|l| l.starts_with("parent-only") || l.starts_with("after-request"))
        .all(|l| l.ends_with(&me));
    assert_eq!(parent_only, 1000);
    assert!(all_in_parent);
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("child ")).count(),
        1000
    );
    assert!(zombies().is_empty());
}

#[tokio::test]
async fn propagated_exit_unwinds_to_the_boundary_which_ends_the_child_with_its_status() {
    let _serial = serial();
    let log = PidLog::new("propagate");
    hooks_into(&log);
    let report_log = log.path.clone();
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        .boundary(&supervisor)
        .catch_panic()
        .report(move |_: &Failure<'_>| common::log_with_pid(&report_log, "report"))
        .layer(ForkGuardLayer::new().propagate_exit())
        .service_fn(forking_handler(&log, InChild::ExitHoldingTransaction));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    log.log("after-request");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &body[..],
        b"Some(5) None",
        "the boundary ended the child with its status"
    );
    assert!(
        supervisor.exit().is_none(),
        "the parent's server is not stopped"
    );

    let lines = log.lines();
    let child = lines[0].rsplit_once("pid=").unwrap().1.to_owned();
    let me = std::process::id().to_string();
    let of = |pid: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.ends_with(&format!("pid={pid}")))
            .map(|l| l.split_whitespace().next().unwrap().to_owned())
            .collect()
    };
    // The destructor ran in the child on the way up, then the hooks.
    assert_eq!(of(&child), ["child", "rolled-back", "hook-1", "hook-2"]);
    assert_eq!(of(&me), ["parent-only", "after-request"]);
    assert!(zombies().is_empty());
}

#[tokio::test]
async fn propagated_exit_dropped_by_a_naive_catch_all_kills_the_child_there() {
    let _serial = serial();
    let log = PidLog::new("armed");
    hooks_into(&log);
    let res = fork_request(
        &log,
        ForkGuardLayer::new().propagate_exit(),
        InChild::ExitHoldingTransaction,
    )
    .await;
    assert_eq!(
        res.body(),
        "None Some(15)",
        "killed when tower-http dropped the exit"
    );
    let lines = log.lines();
    let child = lines[0].rsplit_once("pid=").unwrap().1.to_owned();
    let of_child: Vec<_> = lines
        .iter()
        .filter(|l| l.ends_with(&format!("pid={child}")))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(of_child, ["child", "rolled-back", "hook-1", "hook-2"]);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("after-request"))
            .count(),
        1
    );
    assert!(zombies().is_empty());
}
