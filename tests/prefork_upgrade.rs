//! SIGHUP three times, then SIGUSR2, under continuous load: no request
//! fails, the old master ends with 0 once the new master (the binary
//! re-executed, serving on the inherited socket) accepts, and the new one
//! serves on; and so after a deploy by rename and by symlink, starting the
//! deployed binary. Its own binary: the test process becomes a subreaper,
//! to adopt and reap the new master when the old one ends (no orphan).

mod common;

use common::demo::{example, pid_in, signal, PidLoad, Proc};
use common::get;
use http::StatusCode;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

/// The tests here adopt and reap processes of the whole test binary
/// (subreaper, `waitpid(-1)`): one at a time, so that none reaps another's.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _serial = SERIAL.lock().await;
    let (mut old, addr) = start_master(&example("prefork"));
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
    let mut adopted = Adopted(Some(new_master));
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
    // nothing behind; if that fails, the guard kills and reaps it.
    stop_new_master(new_master, &pids);
    adopted.0 = None;
}

/// The prefork demo at `path` as a master on a free port, 2 workers; this
/// test becomes a subreaper first, to adopt the master a SIGUSR2 starts.
fn start_master(path: &std::path::Path) -> (Proc, SocketAddr) {
    common::become_subreaper();
    let mut command = Command::new(path);
    command.args(["--listen", "127.0.0.1:0", "--workers", "2"]);
    let old = Proc::spawn(command);
    let addr = old.wait_for_line("listening on ").parse().unwrap();
    (old, addr)
}

/// SIGTERM to the new master this test adopted: it ends with 0, and every
/// worker that served (`pids`) is gone and reaped within 5 s.
fn stop_new_master(new_master: u32, pids: &std::collections::HashSet<u32>) {
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

/// A new master this test adopted: killed and reaped if the test fails
/// before it reaped it, so that no process outlives the test.
struct Adopted(Option<u32>);

impl Drop for Adopted {
    fn drop(&mut self) {
        let Some(pid) = self.0 else { return };
        // Never panics (it runs while a failed test unwinds): SIGKILL, then
        // reap it and its workers (they die with it, adopted by this
        // subreaper) for up to 5 s.
        // SAFETY: plain syscalls on a process this test adopted.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            // SAFETY: reaps children of this subreaper test only.
            while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
            if !common::alive(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `start` (a copy of the prefork demo), puts load on it, runs
/// `deploy` (which replaces the binary the way operators do), sends SIGUSR2:
/// the new master runs `expected` (the deployed binary, not the one the
/// old master was started from), the old one drains with 0, no request
/// fails.
async fn deploy_then_upgrade(
    start: &std::path::Path,
    deploy: impl FnOnce(),
    expected: &std::path::Path,
) {
    let _serial = SERIAL.lock().await;
    let (mut old, addr) = start_master(start);
    let load = PidLoad::start(addr, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    deploy();
    signal(old.pid(), libc::SIGUSR2);
    let new_master =
        pid_in(&old.stderr_line("SIGUSR2: new master started", Duration::from_secs(5)));
    let mut adopted = Adopted(Some(new_master));
    let exe = std::fs::read_link(format!("/proc/{new_master}/exe")).unwrap();
    assert_eq!(exe, expected, "the new master runs the deployed binary");
    assert_eq!(old.wait_exit(Duration::from_secs(20)).code(), Some(0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed, pids) = load.stop().await;
    assert!(
        failed.is_empty(),
        "failed requests during the deploy: {failed:?}"
    );
    assert!(ok > 50, "{ok} requests");
    // Stopped and reaped here; if that fails, the guard kills and reaps it.
    stop_new_master(new_master, &pids);
    adopted.0 = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_after_a_rename_deploy_starts_the_new_binary() {
    let dir = common::demo::TempDir::new("rename-deploy");
    let app = dir.0.join("app");
    std::fs::copy(example("prefork"), &app).unwrap();
    let fresh = dir.0.join("app.new");
    deploy_then_upgrade(
        &app,
        || {
            // The usual install: a new file, renamed over the old one (the
            // running binary's file is now deleted).
            std::fs::copy(example("prefork"), &fresh).unwrap();
            std::fs::rename(&fresh, &app).unwrap();
        },
        &app,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_after_a_symlink_switch_starts_the_new_release() {
    let dir = common::demo::TempDir::new("symlink-deploy");
    for release in ["v1", "v2"] {
        std::fs::create_dir_all(dir.0.join(release)).unwrap();
        std::fs::copy(example("prefork"), dir.0.join(release).join("app")).unwrap();
    }
    let current = dir.0.join("current");
    std::os::unix::fs::symlink("v1", &current).unwrap();
    let switch = dir.0.join("current.new");
    deploy_then_upgrade(
        &current.join("app"),
        || {
            // `ln -sfn v2 current`, atomically: a new link renamed over.
            std::os::unix::fs::symlink("v2", &switch).unwrap();
            std::fs::rename(&switch, &current).unwrap();
        },
        &dir.0.join("v2").join("app"),
    )
    .await;
}
