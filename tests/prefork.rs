//! The prefork demo (`examples/prefork`), driven from outside: recycling,
//! a worker killed with SIGKILL, SIGTERM while a request is in flight, and
//! a worker's stop-all exit. No process may be left behind.

mod common;

use common::demo::{example, pid_in, signal, PidLoad, Proc};
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
    let within = Duration::from_secs(5);
    assert!(master.stderr_count_once("worker failed: replacing it", 1, within) >= 1);
    // The hooks ran where they belong: before each of the 3 forks, in each
    // worker, and for the killed one once it was reaped. (Each count waits
    // for its lines: the workers write them on their own time.)
    assert_eq!(
        master.stderr_count_once("hook: forking a worker", 3, within),
        3
    );
    for pid in &seen {
        assert_eq!(
            master.stderr_count_once(&format!("hook: worker {pid} started"), 1, within),
            1
        );
    }
    assert_eq!(
        master.stderr_count_once(
            &format!("hook: worker {victim} ended: signal: 9"),
            1,
            within
        ),
        1
    );
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
            .run_http(|_| {
                tower::service_fn(common::handler::<tower_exit::serve::http::RequestBody>)
            });
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

// ---------------------------------------------------------------------------
// For operators (issue 16): hung workers, memory, exact max_requests,
// reload under load, systemd.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_is_killed_after_the_timeout_and_replaced_while_others_serve() {
    let (mut master, addr) = prefork(&["--workers", "2", "--timeout", "2"]);
    let mut seen = HashSet::new();
    while seen.len() < 2 {
        seen.insert(pid_of_worker(addr).await);
    }
    // `/hang` blocks one worker's thread for good: it never answers.
    let hung = tokio::spawn(get(addr, "/hang"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The other worker serves every request meanwhile.
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let pid = pid_of_worker(addr).await;
        assert!(seen.contains(&pid));
        served += 1;
    }
    assert!(
        served > 10,
        "{served} requests served beside the hung worker"
    );
    let line = master.stderr_line(
        "worker silent for longer than the timeout",
        Duration::from_secs(4),
    );
    let victim = pid_in(&line);
    assert!(seen.contains(&victim), "{line}");
    assert!(line.contains("silent="), "how long it was silent: {line}");
    // Its client sees the connection end; the victim is reaped and replaced.
    let hung = tokio::time::timeout(Duration::from_secs(5), hung)
        .await
        .expect("hung request ended");
    assert!(hung.unwrap().is_err(), "the hung request is never answered");
    let deadline = Instant::now() + Duration::from_secs(3);
    while common::alive(victim) {
        assert!(Instant::now() < deadline, "hung worker not reaped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut fresh = None;
    let deadline = Instant::now() + Duration::from_secs(3);
    while fresh.is_none() {
        assert!(Instant::now() < deadline, "no replacement worker");
        let pid = pid_of_worker(addr).await;
        if !seen.contains(&pid) {
            fresh = Some(pid);
        }
    }
    assert_eq!(
        master.stderr_count("worker silent for longer than the timeout"),
        1
    );
    signal(master.pid(), libc::SIGTERM);
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(0));
    seen.insert(fresh.unwrap());
    assert!(gone(&seen));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_past_max_rss_answers_then_recycles() {
    let (mut master, addr) = prefork(&["--workers", "1", "--max-rss", "64"]);
    let before = pid_of_worker(addr).await;
    let grown = get(addr, "/grow/128").await.expect("answered");
    assert_eq!(grown.status, StatusCode::OK, "{}", grown.body);
    let line = master.stderr_line("worker over max_rss: recycling", Duration::from_secs(5));
    assert!(
        line.contains("rss=") && line.contains("max_rss=67108864"),
        "{line}"
    );
    master.stderr_line("worker recycled", Duration::from_secs(5));
    assert!(!common::alive(before));
    let after = pid_of_worker(addr).await;
    assert_ne!(after, before, "a fresh worker serves");
    signal(master.pid(), libc::SIGTERM);
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert!(gone(&HashSet::from([before, after])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_1_is_exact_under_keep_alive_clients() {
    let (mut master, addr) = prefork(&["--workers", "1", "--max-requests", "1"]);
    // 8 keep-alive clients (pooled connections), 3 requests each.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut pids = Vec::new();
            for _ in 0..3 {
                let res = client
                    .get(format!("http://{addr}/pid").parse().unwrap())
                    .await
                    .expect("no failed request");
                assert_eq!(res.status(), StatusCode::OK);
                let body = http_body_util::BodyExt::collect(res.into_body())
                    .await
                    .unwrap();
                pids.push(
                    String::from_utf8_lossy(&body.to_bytes())
                        .parse::<u32>()
                        .unwrap(),
                );
            }
            pids
        }));
    }
    let mut answers: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for task in tasks {
        for pid in task.await.unwrap() {
            *answers.entry(pid).or_default() += 1;
        }
    }
    assert_eq!(answers.values().sum::<usize>(), 24);
    assert!(
        answers.values().all(|&n| n == 1),
        "a worker served more than one request: {answers:?}"
    );
    signal(master.pid(), libc::SIGTERM);
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert!(gone(&answers.keys().copied().collect()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_three_times_under_load_fails_no_request() {
    let (mut master, addr) = prefork(&["--workers", "2"]);
    let load = PidLoad::start(addr, 4);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        signal(master.pid(), libc::SIGHUP);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ok, failed, pids) = load.stop().await;
    assert!(
        failed.is_empty(),
        "failed requests during SIGHUP: {failed:?}"
    );
    assert!(ok > 100, "{ok} requests");
    assert!(
        pids.len() >= 8,
        "4 generations of 2 workers served: {pids:?}"
    );
    assert_eq!(
        master.stderr_count("SIGHUP: new workers accept, old ones drain"),
        3
    );
    signal(master.pid(), libc::SIGTERM);
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert!(gone(&pids));
}

/// A SIGHUP under load while every worker recycles after a few requests
/// (`--max-requests 5`), three times: each reload completes (new workers
/// accept, the old ones drain, systemd is told `READY=1`) within 2 s, and
/// no request fails.
/// A worker that drained by itself counts as one that accepted: the master
/// used to wait for a look at which every serving worker had beaten, which
/// constant recycling may never give (a stalled reload: > 6 s, and a
/// `systemctl reload` waiting for `READY=1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_completes_while_workers_recycle_constantly() {
    let (mut master, addr) = prefork(&["--workers", "2", "--max-requests", "5"]);
    let load = PidLoad::start(addr, 4);
    let mut took = Vec::new();
    for reload in 1..=3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let hup = Instant::now();
        signal(master.pid(), libc::SIGHUP);
        let done = "SIGHUP: new workers accept, old ones drain";
        let count = master.stderr_count_once(done, reload, Duration::from_secs(2));
        assert_eq!(count, reload, "reload {reload} not done within 2 s");
        took.push(hup.elapsed());
    }
    let (ok, failed, pids) = load.stop().await;
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let recycled = master.stderr_count("worker recycled");
    eprintln!(
        "3 SIGHUPs with workers recycling ({recycled} recycles, {ok} requests): done in {took:?}"
    );
    assert!(
        recycled > 10,
        "{recycled} recycles: not the load this test needs"
    );
    signal(master.pid(), libc::SIGTERM);
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert!(gone(&pids));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_socket_activation_and_notify() {
    let dir = common::demo::TempDir::new("prefork-systemd");
    let notify_path = dir.0.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = common::demo::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // systemd-socket-activate binds, then (on the first connection) execs
    // the demo with LISTEN_FDS=1, LISTEN_PID its own pid: no --listen.
    let mut command = Command::new("systemd-socket-activate");
    command
        .args(["-l", &addr.to_string()])
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg(example("prefork"))
        .args(["--workers", "1"]);
    let mut master = Proc::spawn(command);
    // The first connection starts the server, then is served.
    let mut pid = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid.is_none() {
        assert!(
            Instant::now() < deadline,
            "not served: {:?}",
            master.stderr.lock().unwrap()
        );
        if let Ok(Ok(reply)) =
            tokio::time::timeout(Duration::from_secs(10), get(addr, "/pid")).await
        {
            pid = reply.body.parse::<u32>().ok();
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut said = Vec::new();
    let mut buf = [0u8; 512];
    while !said.iter().any(|m: &String| m.contains("READY=1")) {
        let n = notify.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        said.iter()
            .any(|m| m.contains(&format!("MAINPID={}", master.pid()))),
        "{said:?}"
    );
    signal(master.pid(), libc::SIGTERM);
    while !said.iter().any(|m| m.contains("STOPPING=1")) {
        let n = notify.recv(&mut buf).expect("STOPPING=1 on NOTIFY_SOCKET");
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(0));
    assert!(gone(&HashSet::from([pid.unwrap()])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_in_a_workers_background_task_drains_that_worker_with_its_code() {
    let (mut master, addr) = prefork(&["--workers", "1"]);
    let worker = pid_of_worker(addr).await;
    let slow = tokio::spawn(get(addr, "/slow"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let scheduled = get(addr, "/background-exit/7").await.expect("answered");
    assert_eq!(scheduled.status, StatusCode::OK);
    // The worker drains: the request in flight is answered, not cut.
    let slow = slow
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(
        (slow.status, slow.body.as_str()),
        (StatusCode::OK, "slow\n")
    );
    // Said at the raise, with where it was raised, and the worker ends
    // with the exit's code.
    let said = master.stderr_line(
        "exit raised where nothing exit-aware catches it (a background task",
        Duration::from_secs(5),
    );
    assert!(said.contains("examples/demo/mod.rs"), "{said}");
    master.stderr_line(
        &format!("hook: worker {worker} ended: exit status: 7"),
        Duration::from_secs(5),
    );
    let replacement = pid_of_worker(addr).await;
    assert_ne!(replacement, worker);
    assert!(!common::alive(worker));
    signal(master.pid(), libc::SIGTERM);
    assert_eq!(master.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

/// nginx keeps FastCGI connections (`fastcgi_keep_conn on`, `keepalive`)
/// whatever a response's headers say: a worker whose budget is spent
/// closes its kept connections after their last request's END_REQUEST,
/// so nginx sends the next request on a new connection, to a worker with
/// budget left, instead of getting `503`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastcgi_workers_behind_nginx_keep_conn_recycle_without_a_503() {
    let (_app, addr) = prefork(&["--fastcgi", "--workers", "2", "--max-requests", "50"]);
    let dir = common::demo::TempDir::new("prefork-keep-conn");
    let (_nginx, port) = common::demo::nginx(&dir, &addr.to_string());
    let front: SocketAddr = ([127, 0, 0, 1], port).into();
    let load = PidLoad::start(front, 8);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (ok, failed, pids) = load.stop().await;
    let shown: Vec<_> = failed.iter().take(5).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {shown:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    // 50 requests a worker: dozens of recycles.
    assert!(pids.len() > 10, "{} workers for {ok} requests", pids.len());
}

/// HTTP/2 streams past a worker's budget are refused (`REFUSED_STREAM`:
/// never processed) and the connection told GOAWAY, not answered `503`: a
/// client sends them again on a new connection, to a worker with budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_past_the_budget_are_refused_not_503() {
    let (_app, addr) = prefork(&["--workers", "2", "--max-requests", "5"]);
    let mut answered = 0;
    let mut refused = 0;
    let mut pending: Vec<u32> = (0..16).collect();
    for _round in 0..20 {
        if pending.is_empty() {
            break;
        }
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let sent: Vec<_> = pending
            .drain(..)
            .map(|i| {
                let mut sender = sender.clone();
                tokio::spawn(async move {
                    let req = http::Request::get("/pid")
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap();
                    (i, sender.send_request(req).await)
                })
            })
            .collect();
        for task in sent {
            let (i, res) = task.await.unwrap();
            match res {
                Ok(res) => {
                    assert_eq!(res.status(), StatusCode::OK, "stream {i}");
                    answered += 1;
                }
                Err(err) => {
                    // Refused, or never sent once GOAWAY came: both safe to
                    // send again.
                    let h2 = std::error::Error::source(&err)
                        .and_then(|source| source.downcast_ref::<h2::Error>());
                    let safe = err.is_canceled()
                        || h2.is_some_and(|h2| {
                            h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                                || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
                        });
                    assert!(
                        safe,
                        "stream {i}: {err} ({:?})",
                        std::error::Error::source(&err)
                    );
                    refused += 1;
                    pending.push(i);
                }
            }
        }
    }
    assert_eq!(answered, 16, "{refused} refused, {pending:?} left");
    assert!(
        refused > 0,
        "16 streams on workers of 5 requests: some must be refused"
    );
}

/// A worker that recycles while an HTTP/2 client keeps its connection
/// (a client that stopped reading: it never acknowledges the GOAWAY's
/// PING, so the worker drains until its grace runs out, 10 s in the demo)
/// has its replacement forked when it starts draining, not when it ends
/// (the worker wakes its master with SIGCHLD): a new client is answered
/// within 100 ms (10.0 s when the replacement waited for the end; 190 ms
/// when the master only looked every 100 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recycling_workers_replacement_serves_while_it_still_drains() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (app, addr) = prefork(&["--workers", "1", "--max-requests", "3"]);
    // HTTP/2 by hand: the preface, empty SETTINGS, one GET / (HPACK:
    // :method GET, :scheme http, :path /, :authority x), then silence.
    let mut frozen = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let headers = [0x82, 0x86, 0x84, 0x41, 0x01, b'x'];
    out.extend_from_slice(&[0, 0, headers.len() as u8, 1, 0x05, 0, 0, 0, 1]);
    out.extend_from_slice(&headers);
    frozen.write_all(&out).await.unwrap();
    // Its answer arrives (and is left unread, with what follows).
    let mut first = [0u8; 9];
    frozen.read_exact(&mut first).await.unwrap();
    // Two more requests spend the budget of 3: the worker drains, held
    // by the frozen connection.
    let old = pid_of_worker(addr).await;
    assert_eq!(pid_of_worker(addr).await, old);
    let started = Instant::now();
    let next = pid_of_worker(addr).await;
    let waited = started.elapsed();
    eprintln!("a new client while the only worker drains: answered in {waited:?}");
    assert_ne!(next, old, "answered by the draining worker");
    assert!(
        waited < Duration::from_millis(100),
        "a new client waited {waited:?}"
    );
    app.stderr_line("forking its replacement now", Duration::from_secs(5));
    drop(frozen);
}

/// Four clients growing a worker's memory (4 MiB a request, kept) as fast
/// as they can: it is recycled at its `max_rss` plus what the requests in
/// flight when it crossed allocate (four clients, 4 MiB each), not a
/// second's growth past it (the 1.0 GB against 64 MiB, when memory
/// was read once a second; 90 MiB when it was read every 10 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rss_holds_under_clients_growing_memory_fast() {
    let (master, addr) = prefork(&["--workers", "1", "--max-rss", "64"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = get(addr, "/grow/4").await;
                }
            })
        })
        .collect();
    // The workers' resident memory, sampled every 2 ms for 3 s.
    let mut peak_kib = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for (pid, _) in common::children_of(master.pid()) {
            // A worker may end between the listing and the read.
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let rss_kib = status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|kib| kib.trim().trim_end_matches(" kB").parse().ok())
                .unwrap_or(0);
            peak_kib = peak_kib.max(rss_kib);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let recycled = master.stderr_count("worker over max_rss: recycling");
    let peak_mib = peak_kib / 1024;
    eprintln!("peak worker RSS: {peak_mib} MiB for a limit of 64 MiB, {recycled} recycles");
    // The limit, one request's growth per client in flight, and 4 MiB for
    // the allocator and the responses.
    assert!(
        peak_mib <= 64 + 4 * 4 + 4,
        "a worker reached {peak_mib} MiB"
    );
    assert!(recycled >= 3, "{recycled} recycles in 3 s");
}

/// How long `GET /pid` on a new connection takes to be answered `200`
/// (failing the test after 10 s).
async fn answered_in(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(10), get(addr, "/pid")).await;
    assert!(
        matches!(&reply, Ok(Ok(reply)) if reply.status == StatusCode::OK),
        "{reply:?}"
    );
    started.elapsed()
}

/// Connections that hold a worker's budget but send nothing do not keep
/// real clients out: with `--max-requests 10`, 20 silent connections hold
/// every unit (each accepted connection holds one for its first request),
/// yet a real request is answered within 1 s; the worker closes the
/// silent connections, the oldest first, to make room. The same for a
/// keep-alive connection idle after its request, holding the last unit
/// (the new client waited 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_nothing_do_not_hold_the_budget_against_real_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_app, addr) = prefork(&["--workers", "1", "--max-requests", "10"]);
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waited = answered_in(addr).await;
    eprintln!("a real request behind 20 silent connections: {waited:?}");
    assert!(
        waited < Duration::from_secs(1),
        "a real request waited {waited:?} behind 20 silent connections"
    );
    // Silent connections were closed for it, the oldest first.
    let mut closed = Vec::new();
    for (i, conn) in silent.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(10), conn.read(&mut byte)).await
        {
            closed.push(i);
        }
    }
    assert!(!closed.is_empty() && closed[0] == 0, "closed: {closed:?}");
    drop(silent);

    // A fresh worker's budget of 3: a keep-alive client's connection,
    // idle after its request, holds a unit; a second client's request
    // spends the last one. A third client gets in (within the idle
    // minimum and a little), not after the idle timeout.
    let (_app, addr) = prefork(&["--workers", "1", "--max-requests", "3"]);
    let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /pid HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 512];
    let n = kept.read(&mut answer).await.unwrap();
    let head = String::from_utf8_lossy(&answer[..n]).to_lowercase();
    assert!(
        head.starts_with("http/1.1 200") && !head.contains("connection: close"),
        "{head}"
    );
    assert_eq!(get(addr, "/pid").await.unwrap().status, StatusCode::OK);
    let waited = answered_in(addr).await;
    eprintln!("a client behind an idle keep-alive connection holding the last unit: {waited:?}");
    assert!(
        waited < Duration::from_secs(2),
        "the third client waited {waited:?}"
    );
    assert_eq!(
        kept.read(&mut answer).await.unwrap(),
        0,
        "the idle connection was closed"
    );
}

/// FastCGI: a kept connection idle after its request holds a unit of the
/// worker's budget for its next request. When open connections hold every
/// unit it is closed after 1 s idle, so the worker accepts again (at
/// `--max-requests 3`, after a kept connection's request and a one-shot
/// one, the kept connection held the last unit: a new connection waited
/// until the 60 s idle timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_fastcgi_connection_idle_with_the_last_unit_makes_room() {
    use tokio::io::AsyncReadExt;
    let (_app, addr) = prefork(&["--fastcgi", "--workers", "1", "--max-requests", "3"]);
    // The accept loop holds the second unit for the next connection; the
    // kept connection's next request takes the third.
    let mut kept = fastcgi_pid(addr, true).await;
    fastcgi_pid(addr, false).await;
    let started = Instant::now();
    fastcgi_pid(addr, false).await;
    let waited = started.elapsed();
    eprintln!("a new FastCGI connection behind a kept one holding the last unit: {waited:?}");
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(1), kept.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "the idle kept connection was closed: {read:?}"
    );
}

/// `/pid` over a new FastCGI connection, asking to keep it or not: the
/// connection, once the request ended (failing the test after 5 s).
async fn fastcgi_pid(addr: SocketAddr, keep: bool) -> tokio::net::TcpStream {
    use common::fcgi::{read_until_end, request, response_of};
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&request(1, keep, "/pid", b""))
        .await
        .unwrap();
    let (stdout, end) = response_of(&read_until_end(&mut stream, &[1]).await, 1);
    assert_eq!(end, Some(0), "not answered: {stdout:?}");
    stream
}
