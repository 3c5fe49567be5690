//! Load and fault runs against the demo apps, as separate processes, with
//! real peers. Too long for every `cargo test` in debug mode, so they are
//! `#[ignore]`d; `.ci/run` runs them in release mode (`.ci/reliability`,
//! about 35 s after the build):
//!
//! ```sh
//! cargo build --release --all-features --examples
//! cargo test --release --all-features --test reliability -- --ignored --nocapture --test-threads 1
//! ```
//!
//! - load: 100,000 mixed requests (ok, fail, panic, slow, fork) against the
//!   HTTP demo and the FastCGI demo behind nginx: every request answered
//!   exactly once with the expected status, every real failure reported
//!   exactly once, no exit reported, no zombie, resident memory flat;
//! - SIGTERM, or a request to `/exit/7`, during load: every request
//!   answered is answered right, the process exits 0, or 7;
//! - a prefork worker killed under load: every answer is right, only the
//!   killed worker's unacknowledged requests fail, the master goes on;
//! - clients hanging up mid-request under load (HTTP demo, and FastCGI demo
//!   behind nginx): never reported, every connection closed, memory flat;
//! - `FCGI_ABORT_REQUEST` mid-body under load: the request ends at once, its
//!   connection serves on;
//! - the seed scenario 1,000 times in a row under load: every answer from
//!   the parent, each child seen once, no child left;
//! - 1,100 trickling uploads and 100 slow readers of 8 MiB against a
//!   2-worker prefork at `ulimit -n 1024`: every legitimate request
//!   answered right within 10 s.

mod common;

use common::demo::{example, nginx, Proc, TempDir};
use common::{children_of, resident_kib};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOTAL: usize = 100_000;
/// Requests before the memory baseline of a load run: the HTTP demo's RSS
/// rises while the allocator's arenas grow, then stays on a plateau
/// (BENCHMARKS.md has a 1,000,000-request run). A baseline taken at 10,000,
/// then at 30,000 requests, still sat on the slope and put leak-free runs
/// over the 10 % bound (+11.5 %, +10.7 %); measured 2026-11-26, RSS every
/// 25,000: 5,496, 5,968, 6,080, 6,116, 6,176, 6,240, 6,296, 6,316, 6,320,
/// 6,328 KiB, then +0.1 % over the next 100,000. So the baseline is taken
/// on the plateau, and the warm-up prints its steps.
const WARM_UP: usize = 200_000;
const CONCURRENCY: usize = 32;

/// Route of request `i`: 1 in 1000 is slow, 1 in 100 forks, 1 in 50 fails,
/// 1 in 50 panics, the rest are ok.
fn route(i: usize) -> (&'static str, StatusCode) {
    match i % 1000 {
        0 => ("/slow", StatusCode::OK),
        n if n % 100 == 1 => ("/fork", StatusCode::OK),
        n if n % 50 == 2 => ("/fail", StatusCode::INTERNAL_SERVER_ERROR),
        n if n % 50 == 3 => ("/panic", StatusCode::INTERNAL_SERVER_ERROR),
        _ => ("/", StatusCode::OK),
    }
}

fn zombie_children(pid: u32) -> usize {
    children_of(pid)
        .iter()
        .filter(|(_, state)| state == "Z")
        .count()
}

/// How many file descriptors `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[derive(Default)]
struct Tally {
    wrong: AtomicUsize,
    failed: AtomicUsize,
    panicked: AtomicUsize,
    forked: AtomicUsize,
    answered: AtomicUsize,
}

impl Tally {
    fn get(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::Relaxed)
    }

    /// `total` requests answered, each with the expected status.
    fn assert_all_right(&self, total: usize) {
        assert_eq!(
            Tally::get(&self.answered),
            total,
            "every request answered once"
        );
        assert_eq!(Tally::get(&self.wrong), 0, "every status as expected");
    }

    /// Every real failure reported exactly once, no exit reported. Reports
    /// are written by the demo's TracingReporter, one line each.
    async fn assert_reported_once(&self, app: &Proc) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(app.stderr_count("service failed"), Tally::get(&self.failed));
        assert_eq!(
            app.stderr_count("service panicked"),
            Tally::get(&self.panicked)
        );
        assert_eq!(app.stderr_count("service exited"), 0);
    }
}

/// Sends `requests` (request numbers) through `base`, CONCURRENCY at a time,
/// with a keep-alive client; counts what came back.
async fn drive(base: String, requests: std::ops::Range<usize>, tally: Arc<Tally>) {
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let next = Arc::new(AtomicUsize::new(requests.start));
    let end = requests.end;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (client, base, next, tally) =
            (client.clone(), base.clone(), next.clone(), tally.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return;
                }
                let (path, expected) = route(i);
                let uri = format!("{base}{path}").parse().unwrap();
                match client.get(uri).await {
                    Ok(res) => {
                        let status = res.status();
                        let _ = res.into_body().collect().await;
                        tally.answered.fetch_add(1, Ordering::Relaxed);
                        if status != expected {
                            tally.wrong.fetch_add(1, Ordering::Relaxed);
                            eprintln!("request {i}: {path} answered {status}, expected {expected}");
                        }
                        match path {
                            "/fail" => tally.failed.fetch_add(1, Ordering::Relaxed),
                            "/panic" => tally.panicked.fetch_add(1, Ordering::Relaxed),
                            "/fork" => tally.forked.fetch_add(1, Ordering::Relaxed),
                            _ => 0,
                        };
                    }
                    Err(err) => panic!("request {i} ({path}) not answered: {err}"),
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
}

async fn load_run(app: &mut Proc, base: String) {
    let pid = app.pid();
    let tally = Arc::new(Tally::default());
    let mut done = 0;
    while done < WARM_UP {
        drive(base.clone(), done..done + 25_000, tally.clone()).await;
        done += 25_000;
        eprintln!("warm-up {done}: RSS {} KiB", resident_kib(pid));
    }
    let rss_warm = resident_kib(pid);
    let started = Instant::now();
    drive(base.clone(), WARM_UP..WARM_UP + TOTAL, tally.clone()).await;
    let elapsed = started.elapsed();
    let rss_end = resident_kib(pid);

    tally.assert_all_right(WARM_UP + TOTAL);
    tally.assert_reported_once(app).await;
    assert_eq!(zombie_children(pid), 0, "no zombie");
    let growth = rss_end as f64 / rss_warm as f64;
    assert!(
        growth <= 1.10,
        "resident memory {rss_warm} KiB -> {rss_end} KiB"
    );
    println!(
        "{TOTAL} requests after a warm-up of {WARM_UP}, in {:.1} s ({:.0}/s): 0 wrong, {} failures and {} panics reported once each (warm-up included), 0 exits reported, 0 zombies, RSS {rss_warm} -> {rss_end} KiB ({:+.1} %)",
        elapsed.as_secs_f64(),
        TOTAL as f64 / elapsed.as_secs_f64(),
        Tally::get(&tally.failed),
        Tally::get(&tally.panicked),
        (growth - 1.0) * 100.0
    );
}

/// The FastCGI demo behind nginx: the demo, nginx, nginx's directory, the
/// demo's address and nginx's port. Drop them to stop both.
fn fastcgi_demo_behind_nginx(name: &str) -> (Proc, Proc, TempDir, String, u16) {
    let dir = TempDir::new(name);
    let app = spawn_example("fastcgi", "127.0.0.1:0");
    let upstream = app.wait_for_line("listening on ");
    let (nginx, port) = nginx(&dir, &upstream);
    (app, nginx, dir, upstream, port)
}

fn spawn_example(name: &str, listen: &str) -> Proc {
    let mut command = Command::new(example(name));
    command.args(["--listen", listen]);
    Proc::spawn(command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn load_on_the_http_demo() {
    let mut app = spawn_example("http", "127.0.0.1:0");
    let addr = app.wait_for_line("listening on ");
    load_run(&mut app, format!("http://{addr}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn load_on_the_fastcgi_demo_behind_nginx() {
    let (mut app, _nginx, _dir, _, port) = fastcgi_demo_behind_nginx("reliability-nginx");
    load_run(&mut app, format!("http://127.0.0.1:{port}")).await;
}

/// How the server is told to end, in [`drain_during_load`].
enum Ending {
    Sigterm,
    /// A request to `/exit/N`.
    Exit(i32),
}

/// 32 clients, a new connection per request, against the HTTP demo; after
/// 1.5 s the server is told to end. Every request answered is answered
/// right; the others fail on the client's side (never acknowledged); the
/// process exits with the code of its ending. Returns how many were
/// answered, how many clients then found the port closed, and the code.
async fn drain_during_load(ending: Ending) -> (usize, usize, i32) {
    let mut app = spawn_example("http", "127.0.0.1:0");
    let addr = app.wait_for_line("listening on ");
    let base = format!("http://{addr}");
    let answered = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (base, answered, refused) = (base.clone(), answered.clone(), refused.clone());
        tasks.spawn(async move {
            for i in 0..2_000 {
                let stream = match tokio::net::TcpStream::connect(
                    base.trim_start_matches("http://"),
                )
                .await
                {
                    Ok(stream) => stream,
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                let (path, expected) = route(i);
                let path = if path == "/slow" { "/" } else { path };
                let expected = if path == "/" {
                    StatusCode::OK
                } else {
                    expected
                };
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                else {
                    return;
                };
                tokio::spawn(conn);
                let req = http::Request::get(path)
                    .header("host", "x")
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap();
                match sender.send_request(req).await {
                    // Answered: must be right.
                    Ok(res) => {
                        assert_eq!(res.status(), expected, "{path}");
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    // Not answered (the server closed before reading it):
                    // the client knows it was not handled.
                    Err(_) => return,
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expected_code = match ending {
        Ending::Sigterm => {
            // SAFETY: plain syscall to the process this test started.
            unsafe { libc::kill(app.pid() as i32, libc::SIGTERM) };
            0
        }
        Ending::Exit(code) => {
            let client: Client<_, Empty<bytes::Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            let res = client
                .get(format!("{base}/exit/{code}").parse().unwrap())
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
            code
        }
    };
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    let status = tokio::task::block_in_place(|| app.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(expected_code));
    assert_eq!(
        app.stderr_count("service exited"),
        0,
        "an exit is not reported"
    );
    (
        answered.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        expected_code,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn sigterm_during_load_answers_what_it_accepted_and_exits_0() {
    let (answered, refused, code) = drain_during_load(Ending::Sigterm).await;
    println!(
        "SIGTERM during load: {answered} requests answered right before the drain, then {refused} clients refused; exit {code}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn an_exit_during_load_answers_what_was_accepted_and_becomes_the_exit_code() {
    let (answered, refused, code) = drain_during_load(Ending::Exit(7)).await;
    println!(
        "/exit/7 during load: {answered} requests answered right before the drain, then {refused} clients refused; exit {code}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn a_prefork_worker_killed_under_load_loses_nothing_acknowledged() {
    let mut command = Command::new(example("prefork"));
    command.args(["--listen", "127.0.0.1:0", "--workers", "2"]);
    let mut master = Proc::spawn(command);
    let addr = master.wait_for_line("listening on ");
    let base = format!("http://{addr}");
    let answered = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (base, answered, cut) = (base.clone(), answered.clone(), cut.clone());
        tasks.spawn(async move {
            let client: Client<_, Empty<bytes::Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            for _ in 0..5_000 {
                match client.get(format!("{base}/pid").parse().unwrap()).await {
                    Ok(res) => {
                        assert_eq!(res.status(), StatusCode::OK, "an answer is always right");
                        let body = res.into_body().collect().await.unwrap().to_bytes();
                        assert!(std::str::from_utf8(&body).unwrap().parse::<u32>().is_ok());
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    // The killed worker's connections: never acknowledged.
                    Err(_) => {
                        cut.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_kill = answered.load(Ordering::Relaxed);
    let victim: u32 = {
        let res = Client::builder(TokioExecutor::new())
            .build_http::<Empty<bytes::Bytes>>()
            .get(format!("{base}/pid").parse().unwrap())
            .await
            .unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        std::str::from_utf8(&body).unwrap().parse().unwrap()
    };
    // SAFETY: plain syscall to a worker of the master this test started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    // SAFETY: as above, to the master.
    unsafe { libc::kill(master.pid() as i32, libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| master.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(0));
    assert!(master.stderr_count("worker failed: replacing it") >= 1);
    let total = answered.load(Ordering::Relaxed);
    assert!(total > before_kill, "the load went on after the kill");
    println!(
        "prefork worker killed under load after {before_kill} requests: {total} answered in all, every one right; {} cut with the worker (never acknowledged); master exit 0",
        cut.load(Ordering::Relaxed)
    );
}

/// The seed scenario a thousand times in a row (a handler forks, the child
/// exits) on one keep-alive connection, while the mixed load runs on 32
/// others: every answer comes from the parent, once; every child printed
/// its line once and was reaped; nothing else changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn seed_scenario_a_thousand_times_in_a_row_under_load() {
    let app = spawn_example("http", "127.0.0.1:0");
    let addr = app.wait_for_line("listening on ");
    let base = format!("http://{addr}");
    let server = app.pid();
    const LOAD: usize = 30_000;
    let tally = Arc::new(Tally::default());
    let load = tokio::spawn(drive(base.clone(), 0..LOAD, tally.clone()));

    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut children = Vec::new();
    for i in 0..1000 {
        let res = client
            .get(format!("{base}/fork").parse().unwrap())
            .await
            .unwrap_or_else(|err| panic!("fork request {i} not answered: {err}"));
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let body = std::str::from_utf8(&body).unwrap();
        // "parent P: forked child C ended with exit status: 0"
        let (parent, child) = body
            .strip_prefix("parent ")
            .and_then(|rest| rest.split_once(": forked child "))
            .unwrap_or_else(|| panic!("unexpected answer {body:?}"));
        assert_eq!(
            parent.parse::<u32>().unwrap(),
            server,
            "parent-only code ran in the parent"
        );
        assert!(body.ends_with("exit status: 0\n"), "{body}");
        let child: u32 = child.split_whitespace().next().unwrap().parse().unwrap();
        children.push(child);
    }
    load.await.unwrap();
    tally.assert_all_right(LOAD);
    tally.assert_reported_once(&app).await;

    // Each child wrote its line once; only children wrote one.
    let lines = app.stdout.lock().unwrap().clone();
    let child_lines: Vec<u32> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("child "))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        child_lines.len(),
        children.len() + Tally::get(&tally.forked),
        "one line per child"
    );
    assert!(children.iter().all(|c| child_lines.contains(c)));
    assert!(!child_lines.contains(&server));
    assert_eq!(children_of(server), vec![], "every child reaped, none left");
    println!(
        "seed scenario 1,000 times in a row under load ({LOAD} mixed requests alongside, {} more forks): 1,000 answers from the parent {server}, one line from each of the 1,000 children, 0 children left, 0 wrong",
        Tally::get(&tally.forked)
    );
}

/// Clients that send `/slow` and hang up before the answer, over and over,
/// while the mixed load runs: the load is answered right, the hang-ups are
/// not reported, the server's file descriptors and memory come back.
async fn hang_ups_under_load(app: &Proc, base: String, quit_to: String) {
    let pid = app.pid();
    // Idle: the listener and the runtime's own descriptors.
    let fds_before = open_fds(pid);

    const LOAD: usize = 45_000;
    let tally = Arc::new(Tally::default());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let quits = Arc::new(AtomicUsize::new(0));
    let mut quitters = tokio::task::JoinSet::new();
    for q in 0..4u64 {
        let (done, quits, quit_to) = (done.clone(), quits.clone(), quit_to.clone());
        quitters.spawn(async move {
            let mut n = 0u64;
            while !done.load(Ordering::Relaxed) {
                let mut stream = tokio::net::TcpStream::connect(&quit_to).await.unwrap();
                tokio::io::AsyncWriteExt::write_all(
                    &mut stream,
                    b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n",
                )
                .await
                .unwrap();
                // Hang up at different points of the request's life.
                tokio::time::sleep(Duration::from_millis(5 + (n * 37 + q * 11) % 200)).await;
                drop(stream);
                quits.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        });
    }
    // The memory baseline is taken under the same traffic, once warm.
    drive(base.clone(), 0..15_000, tally.clone()).await;
    let rss_before = resident_kib(pid);
    drive(base.clone(), 15_000..LOAD, tally.clone()).await;
    let rss_after = resident_kib(pid);
    done.store(true, Ordering::Relaxed);
    while let Some(joined) = quitters.join_next().await {
        joined.unwrap();
    }
    tally.assert_all_right(LOAD);
    tally.assert_reported_once(app).await;

    // Every connection, hung up or not, is closed on the server's side
    // (nginx keeps up to 4 upstream connections open: that much slack).
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) > fds_before + 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fds_after = open_fds(pid);
    assert!(
        fds_after <= fds_before + 4,
        "file descriptors {fds_before} -> {fds_after}"
    );
    let growth = rss_after as f64 / rss_before as f64;
    assert!(
        growth <= 1.10,
        "resident memory {rss_before} KiB -> {rss_after} KiB"
    );
    assert_eq!(zombie_children(pid), 0);
    println!(
        "{} hang-ups during {LOAD} mixed requests: 0 wrong, failures reported once each, hang-ups never, fds {fds_before} -> {fds_after}, RSS {rss_before} -> {rss_after} KiB ({:+.1} %)",
        quits.load(Ordering::Relaxed),
        (growth - 1.0) * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn client_hang_ups_under_load_on_the_http_demo() {
    let app = spawn_example("http", "127.0.0.1:0");
    let addr = app.wait_for_line("listening on ");
    hang_ups_under_load(&app, format!("http://{addr}"), addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn client_hang_ups_under_load_on_the_fastcgi_demo_behind_nginx() {
    let (app, _nginx, _dir, _, port) = fastcgi_demo_behind_nginx("reliability-hangup");
    let front = format!("127.0.0.1:{port}");
    hang_ups_under_load(&app, format!("http://{front}"), front).await;
}

/// `FCGI_ABORT_REQUEST` in the middle of a request body, over and over on
/// four keep-alive connections straight to the FastCGI demo, while nginx
/// sends it the mixed load: each aborted request is ended at once, the
/// rest of its body is ignored, the same connection serves the next
/// request, and the load is answered right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn fastcgi_aborts_mid_body_under_load() {
    use common::fcgi::{
        partial_post, read_until_end, record, request, response_of, rest_of_partial,
    };

    let (app, _nginx, _dir, upstream, port) = fastcgi_demo_behind_nginx("reliability-abort");
    const LOAD: usize = 30_000;
    let tally = Arc::new(Tally::default());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let aborts = Arc::new(AtomicUsize::new(0));
    let mut aborters = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (done, aborts, upstream) = (done.clone(), aborts.clone(), upstream.clone());
        aborters.spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let partial = partial_post(1, "/slow");
            let mut rest = rest_of_partial(1);
            rest.extend(request(2, true, "/", b""));
            while !done.load(Ordering::Relaxed) {
                use tokio::io::AsyncWriteExt;
                stream.write_all(&partial).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                stream.write_all(&record(2, 1, b"")).await.unwrap();
                let recs = read_until_end(&mut stream, &[1]).await;
                assert_eq!(
                    response_of(&recs, 1),
                    (String::new(), Some(0)),
                    "aborted: ended, no output"
                );
                // The body still in flight is ignored; the connection serves on.
                stream.write_all(&rest).await.unwrap();
                let (stdout, end) = response_of(&read_until_end(&mut stream, &[2]).await, 2);
                assert!(stdout.ends_with("hello\n"), "{stdout:?}");
                assert_eq!(end, Some(0));
                aborts.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    drive(format!("http://127.0.0.1:{port}"), 0..LOAD, tally.clone()).await;
    done.store(true, Ordering::Relaxed);
    while let Some(joined) = aborters.join_next().await {
        joined.unwrap();
    }
    tally.assert_all_right(LOAD);
    tally.assert_reported_once(&app).await;
    assert_eq!(zombie_children(app.pid()), 0);
    println!(
        "{} aborts mid-body during {LOAD} mixed requests through nginx: each ended at once, its connection served on; 0 wrong, failures reported once each",
        aborts.load(Ordering::Relaxed)
    );
}

/// Silent peers under load (issue 15): `SILENT` connections that send
/// nothing against a demo capped at `cap` connections with a 3 s peer
/// timeout, while legitimate clients send 20,000 mixed requests through
/// `base`. The server never holds more than its cap, every legitimate
/// request is answered right (some wait for a slot), and the silent peers
/// are shed at the timeout. Prints memory per idle connection and time to
/// shed.
async fn silent_peers_at_the_cap(
    app: &mut Proc,
    base: String,
    silent_to: std::net::SocketAddr,
    cap: usize,
) {
    const SILENT: usize = 2_000;
    let pid = app.pid();
    let tally = Arc::new(Tally::default());
    drive(base.clone(), 0..10_000, tally.clone()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (fds_idle, rss_idle) = (open_fds(pid), resident_kib(pid));

    let opened = Instant::now();
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(tokio::net::TcpStream::connect(silent_to).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds_held, rss_held) = (open_fds(pid), resident_kib(pid));
    let held = fds_held.saturating_sub(fds_idle);
    assert!(
        held <= cap,
        "{held} connections held beyond the cap of {cap}"
    );

    // Legitimate load meanwhile: it waits for slots, then is served.
    let load_started = Instant::now();
    drive(base.clone(), 10_000..30_000, tally.clone()).await;
    let load_took = load_started.elapsed();
    tally.assert_all_right(30_000);

    // Every silent peer is shed at the timeout.
    let mut shed = None;
    while opened.elapsed() < Duration::from_secs(30) {
        if open_fds(pid) <= fds_idle + 2 {
            shed = Some(opened.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shed = shed.expect("silent peers shed within 30 s");
    let per_conn = (rss_held.saturating_sub(rss_idle)) as f64 * 1024.0 / held.max(1) as f64;
    println!(
        "{SILENT} silent connections, cap {cap}: {held} held (fds {fds_idle} -> {fds_held}), \
         ~{per_conn:.0} bytes of RSS each (RSS {rss_idle} -> {rss_held} KiB); 20,000 legitimate \
         requests meanwhile: 0 wrong, in {:.1} s; all silent peers shed {:.1} s after they connected",
        load_took.as_secs_f64(),
        shed.as_secs_f64()
    );
    drop(silent);
    signal_term(app);
}

fn capped_demo(name: &str, cap: usize) -> Proc {
    let mut command = Command::new(example(name));
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--header-timeout",
        "3",
        "--max-connections",
        &cap.to_string(),
    ]);
    Proc::spawn(command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn silent_connections_at_the_cap_under_load_on_the_http_demo() {
    let mut app = capped_demo("http", 1_000);
    let addr = app.wait_for_line("listening on ");
    let silent_to = addr.parse().unwrap();
    silent_peers_at_the_cap(&mut app, format!("http://{addr}"), silent_to, 1_000).await;
}

/// The same against the FastCGI demo (3 s to send a first request), the
/// legitimate load through nginx, the silent peers straight to the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn silent_connections_at_the_cap_under_load_on_the_fastcgi_demo() {
    let dir = TempDir::new("reliability-silent-fastcgi");
    let mut app = capped_demo("fastcgi", 1_000);
    let upstream = app.wait_for_line("listening on ");
    let (_nginx, port) = nginx(&dir, &upstream);
    let silent_to = upstream.parse().unwrap();
    silent_peers_at_the_cap(
        &mut app,
        format!("http://127.0.0.1:{port}"),
        silent_to,
        1_000,
    )
    .await;
}

fn signal_term(app: &mut Proc) {
    // SAFETY: a signal to the demo process this test started.
    assert_eq!(unsafe { libc::kill(app.pid() as i32, libc::SIGTERM) }, 0);
    assert_eq!(app.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

/// FastCGI prefork workers behind nginx with kept connections
/// (`fastcgi_keep_conn on`, `keepalive 8`), recycling every 50 requests and
/// replaced by a SIGHUP every 2 s, under 8 keep-alive clients sending GETs
/// and POSTs (which nginx does not retry), 50,000 requests: none fails. No
/// `503` (a worker closes a kept connection right after the END_REQUEST of
/// the last request its budget allows, or when draining after the next
/// request that comes within 1 s), no `502` (that END_REQUEST is followed
/// by a close notice, so nginx never reuses the closing connection).
/// `benches/nginx_pool.rs` runs the same against gunicorn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn fastcgi_prefork_behind_nginx_keep_conn_recycling_and_sighup_fails_no_request() {
    const REQUESTS: usize = 50_000;
    let mut command = Command::new(example("prefork"));
    command.args([
        "--fastcgi",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--max-requests",
        "50",
    ]);
    let app = Proc::spawn(command);
    let upstream = app.wait_for_line("listening on ");
    let dir = TempDir::new("reliability-keep-conn");
    let (_nginx, port) = nginx(&dir, &upstream);
    let run = common::demo::pool_run(port, app.pid(), REQUESTS).await;
    let (took, failed, hups) = (run.took, run.failed, run.hups);
    let recycled = app.stderr_count("worker recycled");
    println!(
        "nginx keep_conn, --max-requests 50, SIGHUP every 2 s ({hups} sent): {REQUESTS} requests \
         in {took:.1?} ({:.0} req/s), {} failed, {recycled} recycles",
        REQUESTS as f64 / took.as_secs_f64(),
        failed.len()
    );
    // No request fails: none is answered 503 for a worker's budget or
    // recycling, and no POST 502 (nginx does not retry a POST it sent on a
    // kept connection that closed under it).
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        hups >= 2 && recycled > 100,
        "{hups} SIGHUPs, {recycled} recycles"
    );
}

/// Raises this process's soft limit on open files to its hard limit (the
/// attack below opens more than 1,024 sockets).
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max.min(65_536);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// Issue 24: a 2-worker prefork HTTP server at `ulimit -n 1024` and its
/// default limits, while 1,100 uploads trickle a byte every 5 s (each
/// reconnecting when cut) and 100 clients read `/big/8` (8 MiB) at a byte a
/// second; 8 legitimate clients meanwhile, a new connection per request,
/// `GET /` and `POST /upload` for 20 s. Every legitimate request answered
/// right within 10 s; their latency (p50, p99, max) and the workers' RSS
/// are printed. `BODY_RATE=0/1` runs the same with the request body rate
/// off (the code before it), for the comparison in BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn trickling_uploads_and_slow_readers_beside_legitimate_load_on_prefork() {
    const TRICKLING: usize = 1_100;
    const READERS: usize = 100;
    const LOAD_FOR: Duration = Duration::from_secs(20);
    raise_nofile();
    let mut command = Command::new("sh");
    command.args([
        "-c",
        "ulimit -n 1024 && exec \"$0\" --listen 127.0.0.1:0 --workers 2 \"$@\"",
        example("prefork").to_str().unwrap(),
    ]);
    if let Ok(rate) = std::env::var("BODY_RATE") {
        command.args(["--min-request-body-rate", &rate]);
    }
    let mut app = Proc::spawn(command);
    let addr = app.wait_for_line("listening on ");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = |app: &Proc| -> u64 {
        children_of(app.pid())
            .iter()
            .map(|(pid, _)| resident_kib(*pid))
            .sum()
    };
    let rss_before = rss(&app);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut attackers = tokio::task::JoinSet::new();
    // Each attacker sends `head`, then a byte every 5 s (an upload) or
    // reads a byte a second (a reader), reconnecting when cut.
    let upload = "POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n";
    let reader = "GET /big/8 HTTP/1.1\r\nhost: x\r\n\r\n";
    for (head, count) in [(upload, TRICKLING), (reader, READERS)] {
        for _ in 0..count {
            let (addr, stop) = (addr.clone(), stop.clone());
            attackers.spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut conn) = tokio::net::TcpStream::connect(&addr).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        continue;
                    }
                    let mut byte = [0u8; 1];
                    while !stop.load(Ordering::Relaxed) {
                        let alive = if head == upload {
                            conn.write_all(b"x").await.is_ok()
                        } else {
                            matches!(conn.read(&mut byte).await, Ok(1))
                        };
                        if !alive {
                            break;
                        }
                        let pause = if head == upload { 5 } else { 1 };
                        tokio::time::sleep(Duration::from_secs(pause)).await;
                    }
                }
            });
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let client: Client<_, String> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let wrong = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut legit = tokio::task::JoinSet::new();
    for c in 0..8 {
        let (client, addr, latencies, wrong) = (
            client.clone(),
            addr.clone(),
            latencies.clone(),
            wrong.clone(),
        );
        legit.spawn(async move {
            let mut i = 0;
            while started.elapsed() < LOAD_FOR {
                i += 1;
                let upload = (c + i) % 2 == 0;
                let req = if upload {
                    http::Request::post(format!("http://{addr}/upload")).body("x".repeat(100))
                } else {
                    http::Request::get(format!("http://{addr}/")).body(String::new())
                }
                .unwrap();
                let sent = Instant::now();
                let exchange = async {
                    let res = client.request(req).await?;
                    let status = res.status();
                    let body = res.into_body().collect().await?.to_bytes();
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, Some(body)))
                };
                let answer = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(err)) => {
                        eprintln!("legitimate request not answered: {err}");
                        (StatusCode::BAD_GATEWAY, None)
                    }
                    Err(_) => {
                        eprintln!("legitimate request not answered within 10 s");
                        (StatusCode::GATEWAY_TIMEOUT, None)
                    }
                };
                let expected: &[u8] = if upload { b"100 bytes\n" } else { b"hello\n" };
                if answer.0 != StatusCode::OK || answer.1.as_deref() != Some(expected) {
                    wrong.fetch_add(1, Ordering::Relaxed);
                }
                latencies.lock().unwrap().push(sent.elapsed());
            }
        });
    }
    let mut rss_peak = rss(&app);
    while !legit.is_empty() {
        tokio::select! {
            joined = legit.join_next() => joined.unwrap().unwrap(),
            () = tokio::time::sleep(Duration::from_millis(500)) => rss_peak = rss_peak.max(rss(&app)),
        }
    }
    stop.store(true, Ordering::Relaxed);
    attackers.abort_all();
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let cut = app.stderr_count("slower than the minimum rate");
    println!(
        "prefork, 2 workers, ulimit -n 1024, request body rate {}; {TRICKLING} uploads trickling a byte \
         every 5 s and {READERS} readers of /big/8 at a byte a second: {} legitimate requests in \
         {:.0} s, {} wrong; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {cut} slow \
         clients cut; workers' RSS {rss_before} KiB before, peak {rss_peak} KiB",
        std::env::var("BODY_RATE").unwrap_or_else(|_| "default (240/5)".to_owned()),
        latencies.len(),
        LOAD_FOR.as_secs_f64(),
        wrong.load(Ordering::Relaxed),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "legitimate requests went wrong"
    );
    signal_term(&mut app);
}
