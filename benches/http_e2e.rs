//! End to end over HTTP: the full exit-aware stack (boundary, report,
//! catch-panic, fork guard) served by `serve::http`, against the same
//! handler on bare hyper, loaded by wrk from a second process on loopback.
//!
//! Run: `benches/http/run.sh` (installs wrk), or `cargo bench --bench
//! http_e2e` with wrk on the PATH. Environment: `DURATION` (default 5s per
//! round), `ROUNDS` (default 3; rounds alternate the two servers).

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
use tower_exit::{Exit, ServiceBuilderExt, Supervisor};

async fn hello(_: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
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
            tower_exit::serve::http(listener, tower::service_fn(hello), &supervisor).into_future(),
        );
    } else if setup == Setup::Full {
        let svc = ServiceBuilder::new()
            .boundary(&supervisor)
            .catch_panic()
            .report(TracingReporter)
            .fork_guard()
            .service_fn(hello);
        runtime.spawn(tower_exit::serve::http(listener, svc, &supervisor).into_future());
    } else {
        runtime.spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = builder
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(hello))
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

/// wrk's requests/s and p99 latency (µs).
fn load(addr: SocketAddr, duration: &str) -> (f64, f64) {
    let out = Command::new("wrk")
        .args(["-t1", "-c32", "-d", duration, "--latency"])
        .arg(format!("http://{addr}/"))
        .output()
        .expect("wrk on the PATH (benches/http/run.sh installs it)");
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
    assert!(!text.contains("Socket errors"), "{text}");
    (rps, p99)
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

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    let duration = std::env::var("DURATION").unwrap_or_else(|_| "5s".into());
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let setups = [Setup::Bare, Setup::ServeOnly, Setup::Full];
    let mut measured: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); setups.len()];
    for round in 0..rounds {
        // Rotate the order from round to round.
        for i in 0..setups.len() {
            let which = (i + round) % setups.len();
            let (addr, stop) = start(setups[which]);
            let (rps, p99) = load(addr, &duration);
            stop();
            measured[which].0.push(rps);
            measured[which].1.push(p99);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let medians: Vec<(f64, f64)> = measured
        .iter_mut()
        .map(|(r, p)| (median(r), median(p)))
        .collect();
    let (br, bp) = medians[0];
    println!("| server | req/s (median of {rounds}) | ratio | p99 latency | ratio |");
    println!("|---|---:|---:|---:|---:|");
    for (setup, (r, p)) in setups.iter().zip(&medians) {
        println!(
            "| {setup:?} | {r:.0} | {:.3} | {p:.0} µs | {:.3} |",
            r / br,
            p / bp
        );
    }
}
