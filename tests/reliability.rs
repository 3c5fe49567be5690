//! Load and fault runs against the demo apps, as separate processes, with
//! real peers. Too long for every `cargo test` (about a minute in release
//! mode), so they are `#[ignore]`d; run them with:
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
//! - SIGTERM during load: every request answered before the drain is
//!   answered right, the process exits 0;
//! - a prefork worker killed under load: every answer is right, only the
//!   killed worker's unacknowledged requests fail, the master goes on.

mod common;

use common::demo::{example, nginx, Proc, TempDir};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOTAL: usize = 100_000;
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

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn zombie_children(pid: u32) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 1 && fields[0] == "Z" && fields[1] == pid.to_string() {
            count += 1;
        }
    }
    count
}

struct Tally {
    wrong: AtomicUsize,
    failed: AtomicUsize,
    panicked: AtomicUsize,
    answered: AtomicUsize,
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
    let tally = Arc::new(Tally {
        wrong: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        panicked: AtomicUsize::new(0),
        answered: AtomicUsize::new(0),
    });
    let started = Instant::now();
    drive(base.clone(), 0..10_000, tally.clone()).await;
    let rss_warm = resident_kib(pid);
    drive(base.clone(), 10_000..TOTAL, tally.clone()).await;
    let rss_end = resident_kib(pid);
    let elapsed = started.elapsed();

    assert_eq!(
        tally.answered.load(Ordering::Relaxed),
        TOTAL,
        "every request answered once"
    );
    assert_eq!(
        tally.wrong.load(Ordering::Relaxed),
        0,
        "every status as expected"
    );
    // Reports are written by the demo's TracingReporter, one line each.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        app.stderr_count("service failed"),
        tally.failed.load(Ordering::Relaxed)
    );
    assert_eq!(
        app.stderr_count("service panicked"),
        tally.panicked.load(Ordering::Relaxed)
    );
    assert_eq!(app.stderr_count("service exited"), 0);
    assert_eq!(zombie_children(pid), 0, "no zombie");
    let growth = rss_end as f64 / rss_warm as f64;
    assert!(
        growth <= 1.10,
        "resident memory {rss_warm} KiB -> {rss_end} KiB"
    );
    println!(
        "{TOTAL} requests in {:.1} s ({:.0}/s): 0 wrong, {} failures and {} panics reported once each, 0 exits reported, 0 zombies, RSS {rss_warm} -> {rss_end} KiB ({:+.1} %)",
        elapsed.as_secs_f64(),
        TOTAL as f64 / elapsed.as_secs_f64(),
        tally.failed.load(Ordering::Relaxed),
        tally.panicked.load(Ordering::Relaxed),
        (growth - 1.0) * 100.0
    );
}

fn spawn_example(name: &str, listen: &str) -> Proc {
    let mut command = Command::new(example(name));
    command.args(["--listen", listen]);
    Proc::spawn(command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a minute of load: run with --ignored"]
async fn load_on_the_http_demo() {
    let mut app = spawn_example("http", "127.0.0.1:0");
    let addr = app.wait_for_line("listening on ");
    load_run(&mut app, format!("http://{addr}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a minute of load: run with --ignored"]
async fn load_on_the_fastcgi_demo_behind_nginx() {
    let dir = TempDir::new("reliability-nginx");
    let mut app = spawn_example("fastcgi", "127.0.0.1:0");
    let upstream = app.wait_for_line("listening on ");
    let (_nginx, port) = nginx(&dir, &upstream);
    load_run(&mut app, format!("http://127.0.0.1:{port}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load: run with --ignored"]
async fn sigterm_during_load_answers_what_it_accepted_and_exits_0() {
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
    // SAFETY: plain syscall to the process this test started.
    unsafe { libc::kill(app.pid() as i32, libc::SIGTERM) };
    while tasks.join_next().await.is_some() {}
    let status = tokio::task::block_in_place(|| app.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(0));
    println!(
        "SIGTERM during load: {} requests answered right before the drain, then connections refused; exit 0",
        answered.load(Ordering::Relaxed)
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
