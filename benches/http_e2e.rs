//! End to end over HTTP: the full exit-aware stack (boundary, report,
//! catch-panic, fork guard) served by `serve::http`, as four layers and as
//! one (`Supervisor::stack`), against the same handler on bare hyper,
//! loaded by wrk from a second process on loopback.
//!
//! Run: `benches/http/run.sh` (installs wrk), or `cargo bench --bench
//! http_e2e` with wrk on the PATH. Environment: `DURATION` (default 5s per
//! round), `ROUNDS` (default 3; rounds rotate the servers' order),
//! `CONNECTIONS` (the load tool's, default 32), `ONLY` (one server alone,
//! no table), `RATE` (a fixed rate in requests/s, with oha instead of wrk).

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::Command;
use tower::ServiceBuilder;
use tower_exit::report::TracingReporter;
use tower_exit::serve::http::RequestBody;
use tower_exit::{Exit, ServiceBuilderExt, Supervisor};

async fn hello<B>(_: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::from("hello\n")))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Setup {
    /// The handler on hyper-util's auto builder, nothing else.
    Bare,
    /// The handler alone on `serve::http` (its drain bookkeeping).
    ServeOnly,
    /// The full exit-aware stack on `serve::http`.
    Full,
    /// The same stack as one layer (`Supervisor::stack`) on `serve::http`.
    OneLayer,
}

/// Starts a server on its own 1-thread runtime (wrk gets the other core);
/// returns its address and a stop function.
fn start(setup: Setup) -> (SocketAddr, Box<dyn FnOnce()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let supervisor = Supervisor::new();
    if setup == Setup::ServeOnly {
        runtime.spawn(
            tower_exit::serve::http(
                listener,
                tower::service_fn(hello::<RequestBody>),
                &supervisor,
            )
            .into_future(),
        );
    } else if setup == Setup::Full {
        let svc = ServiceBuilder::new()
            .boundary(&supervisor)
            .catch_panic()
            .report(TracingReporter)
            .fork_guard()
            .service_fn(hello::<RequestBody>);
        runtime.spawn(tower_exit::serve::http(listener, svc, &supervisor).into_future());
    } else if setup == Setup::OneLayer {
        let svc = ServiceBuilder::new()
            .layer(
                supervisor
                    .stack()
                    .report(TracingReporter)
                    .fork_guard(tower_exit::ForkGuardLayer::new()),
            )
            .service_fn(hello::<RequestBody>);
        runtime.spawn(tower_exit::serve::http(listener, svc, &supervisor).into_future());
    } else {
        runtime.spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = builder
                    .serve_connection(
                        TokioIo::new(stream),
                        hyper::service::service_fn(hello::<Incoming>),
                    )
                    .into_owned();
                tokio::spawn(conn);
            }
        });
    }
    let stop = move || {
        supervisor.trigger(Exit::success());
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    };
    (addr, Box::new(stop))
}

/// What one load run measured.
#[derive(Clone, Copy, Debug)]
struct Measured {
    /// wrk's requests per second.
    rps: f64,
    /// wrk's 99th percentile latency, µs.
    p99: f64,
    /// CPU time of the server (every thread of this process, user and
    /// system) per request, µs: the steadiest of the three figures, as it
    /// does not depend on how the VM's scheduler shares the cores.
    cpu: f64,
}

/// wrk's connections: `CONNECTIONS`, default 32.
fn connections() -> usize {
    std::env::var("CONNECTIONS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(32)
}

/// CPU time so far of every thread of this process, ns
/// (`/proc/self/task/*/schedstat`).
fn cpu_ns() -> u64 {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// `RATE`: requests per second of an open-loop run with oha (a fixed rate,
/// latencies corrected for coordinated omission); unset: a closed loop with
/// wrk (as fast as the server answers).
fn rate() -> Option<u32> {
    std::env::var("RATE")
        .ok()
        .map(|r| r.parse().expect("RATE is a number"))
}

/// Loads `addr` for `duration`, with wrk or, given `RATE`, oha.
fn load(addr: SocketAddr, duration: &str) -> Measured {
    let cpu_before = cpu_ns();
    let (rps, p99, requests) = match rate() {
        None => wrk(addr, duration),
        Some(rate) => oha(addr, duration, rate),
    };
    let cpu = cpu_ns() - cpu_before;
    Measured {
        rps,
        p99,
        cpu: cpu as f64 / 1000.0 / requests,
    }
}

/// wrk's requests/s, p99 (µs) and request count.
fn wrk(addr: SocketAddr, duration: &str) -> (f64, f64, f64) {
    let out = Command::new("taskset")
        .args(["-c", WRK_CPU, "wrk", "-t1", "--latency", "-d", duration])
        .arg(format!("-c{}", connections()))
        .arg(format!("http://{addr}/"))
        .output()
        .expect("taskset and wrk on the PATH (benches/http/run.sh installs wrk)");
    if !out.status.success() {
        eprintln!(
            "wrk did not run ({}): {}\nrun benches/http/run.sh, which installs wrk, or `apt-get install wrk`",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        std::process::exit(2);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("wrk output");
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| to_micros(v.trim()))
        .expect("wrk --latency output");
    let requests: f64 = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("wrk's request count");
    assert!(!text.contains("Socket errors"), "{text}");
    assert!(!text.contains("Non-2xx"), "{text}");
    (rps, p99, requests)
}

/// oha's requests/s, p99 (µs) and request count, at `rate` requests/s.
fn oha(addr: SocketAddr, duration: &str, rate: u32) -> (f64, f64, f64) {
    let out = Command::new("taskset")
        .args(["-c", WRK_CPU, "oha", "--no-tui", "--latency-correction"])
        .args(["--output-format", "json", "-z", duration, "-q"])
        .arg(rate.to_string())
        .arg(format!("-c{}", connections()))
        .arg(format!("http://{addr}/"))
        .output()
        .expect("taskset and oha on the PATH (benches/http/run.sh installs oha)");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("oha's JSON");
    let statuses = report["statusCodeDistribution"]
        .as_object()
        .expect("statuses");
    assert!(
        statuses.keys().all(|status| status == "200"),
        "{statuses:?}"
    );
    assert_eq!(report["summary"]["successRate"].as_f64(), Some(1.0));
    let requests = statuses["200"].as_f64().expect("a count of 200s");
    let rps = report["summary"]["requestsPerSec"].as_f64().expect("req/s");
    let p99 = report["latencyPercentiles"]["p99"].as_f64().expect("p99") * 1e6;
    (rps, p99, requests)
}

fn to_micros(value: &str) -> f64 {
    let (number, unit) = value.split_at(
        value
            .find(|c: char| c.is_alphabetic())
            .unwrap_or(value.len()),
    );
    let number: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => number,
        "ms" => number * 1000.0,
        "s" => number * 1_000_000.0,
        _ => f64::NAN,
    }
}

/// The CPU the servers run on, and the CPU wrk runs on: pinned apart, so
/// that the scheduler moving them around does not add its own noise.
const SERVER_CPU: &str = "0";
const WRK_CPU: &str = "1";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    // Every thread of this process (the servers' runtimes start later and
    // inherit it) on SERVER_CPU.
    let pinned = Command::new("taskset")
        .args(["-a", "-p", "-c", SERVER_CPU])
        .arg(std::process::id().to_string())
        .output()
        .expect("taskset (util-linux)");
    assert!(pinned.status.success(), "{pinned:?}");
    let duration = std::env::var("DURATION").unwrap_or_else(|_| "5s".into());
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let setups = [Setup::Bare, Setup::ServeOnly, Setup::Full, Setup::OneLayer];
    // `ONLY=Full` (or `Bare`, `ServeOnly`): load that server alone, e.g.
    // under `perf record`; no table.
    if let Ok(only) = std::env::var("ONLY") {
        let setup = *setups
            .iter()
            .find(|s| format!("{s:?}") == only)
            .expect("ONLY is Bare, ServeOnly, Full or OneLayer");
        let (addr, stop) = start(setup);
        let m = load(addr, &duration);
        stop();
        println!("{setup:?}: {m:?}");
        return;
    }
    let mut measured: Vec<Vec<Measured>> = vec![Vec::new(); setups.len()];
    for round in 0..rounds {
        // Rotate the order from round to round.
        for i in 0..setups.len() {
            let which = (i + round) % setups.len();
            let (addr, stop) = start(setups[which]);
            let m = load(addr, &duration);
            stop();
            eprintln!(
                "round {round}: {:?}: {:.0} req/s, p99 {:.0} µs, {:.2} µs CPU/request",
                setups[which], m.rps, m.p99, m.cpu
            );
            measured[which].push(m);
        }
    }
    // Each round measures the three servers back to back: the ratio to the
    // bare server of the same round cancels most of the machine's drift.
    // Report the median over rounds of those paired ratios.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let figure = |which: usize, field: fn(&Measured) -> f64| {
        let value = median(measured[which].iter().map(field).collect());
        let ratio = median(
            measured[which]
                .iter()
                .zip(&measured[0])
                .map(|(m, bare)| field(m) / field(bare))
                .collect(),
        );
        (value, ratio)
    };
    // Interference from the rest of the machine only ever slows a run
    // down, so the best run of each server is the other robust figure.
    let best = |which: usize, field: fn(&Measured) -> f64, better: fn(f64, f64) -> f64| {
        measured[which].iter().map(field).reduce(better).unwrap()
    };
    println!("Medians of {rounds} rounds; ratios are medians of per-round ratios to Bare.");
    println!("| server | req/s | ratio | p99 latency | ratio | server CPU per request | ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (which, setup) in setups.iter().enumerate() {
        let (rps, rps_ratio) = figure(which, |m| m.rps);
        let (p99, p99_ratio) = figure(which, |m| m.p99);
        let (cpu, cpu_ratio) = figure(which, |m| m.cpu);
        println!(
            "| {setup:?} | {rps:.0} | {rps_ratio:.3} | {p99:.0} µs | {p99_ratio:.3} | {cpu:.2} µs | {cpu_ratio:.3} |"
        );
    }
    println!();
    println!("Best run of each server (most req/s, lowest p99, least CPU), ratios to Bare's best.");
    println!("| server | req/s | ratio | p99 latency | ratio | server CPU per request | ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (which, setup) in setups.iter().enumerate() {
        let rps = best(which, |m| m.rps, f64::max);
        let p99 = best(which, |m| m.p99, f64::min);
        let cpu = best(which, |m| m.cpu, f64::min);
        println!(
            "| {setup:?} | {rps:.0} | {:.3} | {p99:.0} µs | {:.3} | {cpu:.2} µs | {:.3} |",
            rps / best(0, |m| m.rps, f64::max),
            p99 / best(0, |m| m.p99, f64::min),
            cpu / best(0, |m| m.cpu, f64::min),
        );
    }
}
