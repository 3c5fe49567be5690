//! The reliability suite's nginx keep-alive pool run
//! (`reliability::fastcgi_prefork_behind_nginx_keep_conn_*`) against each
//! server it compares with: nginx 1.22 in front with `keepalive 8`, 2
//! workers recycling every 50 requests, a SIGHUP to the master every 2 s,
//! 8 keep-alive clients sending `POST /` and `GET /pid` in turn, 50,000
//! requests. Prints one table row per server: failed requests and req/s.
//!
//! ```sh
//! benches/prefork/nginx_pool.sh     # installs gunicorn, builds, runs this
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use common::demo::{example, nginx, nginx_proxy, pool_run, Proc, TempDir};
use std::process::Command;

const REQUESTS: usize = 50_000;

/// One run against `server` (started; it prints its address) behind
/// nginx, through `front` (`nginx` for FastCGI, `nginx_proxy` for HTTP).
async fn row(name: &str, server: Command, address: &str, front: fn(&TempDir, &str) -> (Proc, u16)) {
    let app = Proc::spawn(server);
    let upstream = if address.is_empty() {
        app.wait_for_line("listening on ")
    } else {
        let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
        common::demo::wait_for_port(port, || format!("{name} did not start"));
        address.to_owned()
    };
    let dir = TempDir::new("bench-nginx-pool");
    let (_nginx, port) = front(&dir, &upstream);
    let run = pool_run(port, app.pid(), REQUESTS).await;
    let statuses = |code: &str| run.failed.iter().filter(|f| f.contains(code)).count();
    println!(
        "| {name} | {} | {} | {} | {} | {:.0} | {} |",
        run.failed.len(),
        statuses("503"),
        statuses("502"),
        run.failed.len() - statuses("503") - statuses("502"),
        REQUESTS as f64 / run.took.as_secs_f64(),
        run.hups,
    );
}

fn gunicorn(worker_class: &str, port: u16) -> Command {
    let mut command = Command::new("gunicorn");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/prefork");
    command.args([
        "--chdir",
        dir,
        "--workers",
        "2",
        "--worker-class",
        worker_class,
        "--max-requests",
        "50",
        "--bind",
        &format!("127.0.0.1:{port}"),
        "--log-level",
        "warning",
        "hello:app",
    ]);
    command
}

fn prefork(fastcgi: bool) -> Command {
    let mut command = Command::new(example("prefork"));
    if fastcgi {
        command.arg("--fastcgi");
    }
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--max-requests",
        "50",
    ]);
    command
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; a filter is not supported.
    println!("| server (2 workers, max_requests 50, SIGHUP every 2 s) | failed | 503 | 502 | other | req/s | SIGHUPs |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    row(
        "tower-exit prefork, FastCGI, `fastcgi_keep_conn on`",
        prefork(true),
        "",
        nginx,
    )
    .await;
    row(
        "tower-exit prefork, HTTP, `proxy_pass`",
        prefork(false),
        "",
        nginx_proxy,
    )
    .await;
    for class in ["sync", "gthread"] {
        let port = common::demo::free_port();
        let address = format!("127.0.0.1:{port}");
        let name = format!("gunicorn 27 {class}, `proxy_pass`");
        row(&name, gunicorn(class, port), &address, nginx_proxy).await;
    }
}
