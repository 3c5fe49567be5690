//! SIGHUP three times, then SIGUSR2, under continuous load: no request
//! fails, the old master ends with 0 once the new master (the binary
//! re-executed, serving on the inherited socket) accepts, and the new one
//! serves on. Its own binary: the test process becomes a subreaper, to
//! adopt and reap the new master when the old one ends (no orphan).

mod common;

use common::demo::{example, pid_in, signal, PidLoad, Proc};
use common::get;
use http::StatusCode;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

/// Waits for an adopted process to end and reaps it; its status.
fn reap(pid: u32, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        let mut status = 0;
        // SAFETY: waits for one process this (subreaper) test adopted.
        let rc = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
        if rc == pid as i32 {
            return status;
        }
        assert!(Instant::now() < deadline, "process {pid} did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_three_times_then_sigusr2_under_load_fails_no_request() {
    common::become_subreaper();
    let mut command = Command::new(example("prefork"));
    command.args(["--listen", "127.0.0.1:0", "--workers", "2"]);
    let mut old = Proc::spawn(command);
    let addr: SocketAddr = old.wait_for_line("listening on ").parse().unwrap();

    let load = PidLoad::start(addr, 4);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        signal(old.pid(), libc::SIGHUP);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let upgrade_started = Instant::now();
    signal(old.pid(), libc::SIGUSR2);
    let new_master =
        pid_in(&old.stderr_line("SIGUSR2: new master started", Duration::from_secs(5)));
    // The old master drains and ends 0 once the new one's workers accept.
    assert_eq!(old.wait_exit(Duration::from_secs(20)).code(), Some(0));
    let took = upgrade_started.elapsed();
    assert!(common::alive(new_master), "the new master serves on");
    // Load goes on against the new master alone.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (ok, failed, pids) = load.stop().await;
    assert!(
        failed.is_empty(),
        "failed requests during SIGHUP/SIGUSR2: {failed:?}"
    );
    assert!(ok > 100, "{ok} requests");
    let served_by_new = get(addr, "/pid").await.expect("the new master serves");
    assert_eq!(served_by_new.status, StatusCode::OK);
    assert!(old.stderr_count("upgrade: this master accepts; the old one drains") == 1);
    eprintln!("upgrade took {took:?} (SIGUSR2 to the old master's exit), {ok} requests, 0 failed");
    // The new master (adopted by this test) stops with SIGTERM, leaving
    // nothing behind.
    signal(new_master, libc::SIGTERM);
    let status = reap(new_master, Duration::from_secs(15));
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|pid| common::alive(*pid)) {
        assert!(Instant::now() < deadline, "workers left: {pids:?}");
        // Adopted workers of the old master, if any, are reaped here.
        // SAFETY: reaps children of this subreaper test only.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        std::thread::sleep(Duration::from_millis(20));
    }
}
