//! The prefork demo (`examples/prefork`), driven from outside: recycling,
//! a worker killed with SIGKILL, SIGTERM while a request is in flight, and
//! a worker's stop-all exit. No process may be left behind.

mod common;

use common::demo::{example, Proc};
use common::get;
use http::StatusCode;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tower_exit::serve::prefork::Prefork;

fn prefork(args: &[&str]) -> (Proc, SocketAddr) {
    let mut command = Command::new(example("prefork"));
    command.args(["--listen", "127.0.0.1:0"]).args(args);
    let proc = Proc::spawn(command);
    let addr = proc.wait_for_line("listening on ").parse().unwrap();
    (proc, addr)
}

async fn pid_of_worker(addr: SocketAddr) -> u32 {
    let reply = get(addr, "/pid").await.expect("answered");
    assert_eq!(reply.status, StatusCode::OK);
    reply.body.parse().unwrap()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain syscall to a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

fn gone(pids: &HashSet<u32>) -> bool {
    pids.iter().all(|pid| !common::alive(*pid))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_recycle_after_max_requests_and_every_request_is_answered() {
    let (mut master, addr) = prefork(&["--workers", "2", "--max-requests", "10"]);
    let mut pids = HashSet::new();
    for _ in 0..500 {
        pids.insert(pid_of_worker(addr).await);
    }
    assert!(pids.len() >= 50, "{} distinct workers", pids.len());
    assert!(!pids.contains(&master.pid()), "the master serves nothing");
    signal(master.pid(), libc::SIGTERM);
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert!(gone(&pids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_replaced_within_a_second() {
    let (mut master, addr) = prefork(&["--workers", "2"]);
    let mut seen = HashSet::new();
    while seen.len() < 2 {
        seen.insert(pid_of_worker(addr).await);
    }
    let victim = *seen.iter().next().unwrap();
    signal(victim, libc::SIGKILL);
    let killed = Instant::now();
    loop {
        let pid = pid_of_worker(addr).await;
        if !seen.contains(&pid) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "no new worker within 1 s"
        );
    }
    assert!(!common::alive(victim), "the killed worker was reaped");
    assert!(master.stderr_count("worker failed: replacing it") >= 1);
    signal(master.pid(), libc::SIGTERM);
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_workers_and_the_master_exits_0() {
    let (mut master, addr) = prefork(&["--workers", "2"]);
    let mut pids = HashSet::new();
    for _ in 0..20 {
        pids.insert(pid_of_worker(addr).await);
    }
    let slow = tokio::spawn(get(addr, "/slow"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(master.pid(), libc::SIGTERM);
    let slow = slow.await.unwrap().expect("answered");
    assert_eq!(
        (slow.status, slow.body.as_str()),
        (StatusCode::OK, "slow\n")
    );
    let stopped = Instant::now();
    assert_eq!(master.wait_exit(Duration::from_secs(12)).code(), Some(0));
    assert!(
        stopped.elapsed() < Duration::from_secs(11),
        "within the grace period"
    );
    assert!(gone(&pids), "no worker left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_exit_with_the_stop_all_code_ends_the_server_with_it() {
    let (mut master, addr) = prefork(&["--workers", "2", "--stop-all-code", "5"]);
    let mut pids = HashSet::new();
    for _ in 0..20 {
        pids.insert(pid_of_worker(addr).await);
    }
    // Another code ends only that worker, which is replaced; the server goes on.
    assert_eq!(
        get(addr, "/exit/4").await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    for _ in 0..20 {
        pids.insert(pid_of_worker(addr).await);
    }
    assert_eq!(
        get(addr, "/exit/5").await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(5));
    assert!(gone(&pids), "no worker left");
}

#[test]
fn a_stop_all_code_that_cannot_be_told_from_recycling_is_refused() {
    for code in [0, 256, -1] {
        let run = Prefork::new("127.0.0.1:0".parse().unwrap())
            .stop_all_code(code)
            .run_http(|_| tower::service_fn(common::handler::<hyper::body::Incoming>));
        let err = run.expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{code}");
        assert!(err.to_string().contains("1 to 255"), "{err}");
    }
    // The demo's command line refuses what would be truncated.
    let mut command = Command::new(example("prefork"));
    command.args(["--listen", "127.0.0.1:0", "--stop-all-code", "99999999999"]);
    let mut proc = Proc::spawn(command);
    assert_eq!(proc.wait_exit(Duration::from_secs(10)).code(), Some(2));
    // Its stderr is read by a thread: give it the moment to see the end.
    let deadline = Instant::now() + Duration::from_secs(5);
    while proc.stderr_count("from 1 to 255") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(proc.stderr_count("from 1 to 255"), 1);
}

/// The pidfds open in process `pid`.
fn pidfds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy() == "anon_inode:[pidfd]")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_inherit_no_pidfd_of_their_siblings() {
    let (mut master, addr) = prefork(&["--workers", "4"]);
    let mut pids = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.len() < 4 && Instant::now() < deadline {
        pids.insert(pid_of_worker(addr).await);
    }
    assert_eq!(pids.len(), 4);
    for pid in &pids {
        assert_eq!(pidfds_of(*pid), 0, "worker {pid}");
    }
    signal(master.pid(), libc::SIGTERM);
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert!(gone(&pids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_replaces_every_worker_and_ttin_ttou_change_their_number() {
    let (mut master, addr) = prefork(&["--workers", "2"]);
    let mut before = HashSet::new();
    while before.len() < 2 {
        before.insert(pid_of_worker(addr).await);
    }
    signal(master.pid(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone(&before) {
        assert!(Instant::now() < deadline, "old workers still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut after = HashSet::new();
    for _ in 0..40 {
        after.insert(pid_of_worker(addr).await);
    }
    assert!(after.is_disjoint(&before), "every worker replaced");

    signal(master.pid(), libc::SIGTTIN);
    let deadline = Instant::now() + Duration::from_secs(5);
    while after.len() < 3 {
        assert!(Instant::now() < deadline, "no third worker");
        after.insert(pid_of_worker(addr).await);
    }
    signal(master.pid(), libc::SIGTTOU);
    let deadline = Instant::now() + Duration::from_secs(5);
    while after.iter().filter(|pid| common::alive(**pid)).count() > 2 {
        assert!(Instant::now() < deadline, "still three workers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(master.pid(), libc::SIGTERM);
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert!(gone(&after));
}

#[test]
fn absurd_worker_counts_are_refused_with_a_clear_error() {
    for workers in ["0", "18446744073709551615", "1025"] {
        let mut command = Command::new(example("prefork"));
        command.args(["--listen", "127.0.0.1:0", "--workers", workers]);
        let mut proc = Proc::spawn(command);
        assert_eq!(
            proc.wait_exit(Duration::from_secs(10)).code(),
            Some(1),
            "{workers}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while proc.stderr_count("must be 1 to 1024") == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(proc.stderr_count("must be 1 to 1024"), 1, "{workers}");
        assert_eq!(proc.stderr_count("panicked"), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_end_within_a_second_of_the_masters_sigkill() {
    // Orphans come to this process (not to an init that may not reap
    // them), which reaps them below: none is left behind.
    common::become_subreaper();
    let (mut master, addr) = prefork(&["--workers", "2"]);
    let mut pids = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.len() < 2 && Instant::now() < deadline {
        pids.insert(pid_of_worker(addr).await);
    }
    // A client in the middle of a request: a worker draining gracefully
    // would wait for it (up to its grace period, 10 s in the demo).
    let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut busy, b"GET /slow HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    signal(master.pid(), libc::SIGKILL);
    let _ = master.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    for pid in pids {
        loop {
            let mut status = 0;
            // SAFETY: reaps a worker reparented to this (subreaper) process.
            let reaped = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
            if reaped == pid as i32 || reaped == -1 {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(1),
                "orphaned worker {pid} still running after {:?}",
                killed.elapsed()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    assert!(killed.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_failing_past_the_restart_intensity_stop_the_server() {
    let (mut master, addr) = prefork(&["--workers", "1", "--restart-intensity", "2/30"]);
    let mut pids = HashSet::new();
    pids.insert(pid_of_worker(addr).await);
    // Status 4 is not the stop-all code: each is a failed worker.
    for _ in 0..2 {
        let reply = loop {
            // The replacement may still be starting (backoff 0.1 s).
            match get(addr, "/exit/4").await {
                Ok(reply) => break reply,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(1));
    assert!(master.stderr_count("restart intensity exceeded") >= 1);
}
