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
