//! The demo routes on a prefork server, plus `/pid` (the worker's pid):
//!
//! `cargo run --example prefork -- --listen 127.0.0.1:8080 --workers 4 --max-requests 1000`
//!
//! The master forks the workers before any runtime exists. A worker
//! recycles itself after `--max-requests`; `/exit/N` with N the
//! `--stop-all-code` (default 3) ends the whole server with N; any other
//! `/exit/N` ends that worker, which the master replaces. SIGTERM drains,
//! SIGINT stops at once, SIGHUP replaces every worker, SIGTTIN/SIGTTOU add
//! or remove one. `--restart-intensity N/SECS` stops the server (status 1)
//! when workers fail N times within SECS seconds.

mod demo;

use std::process::ExitCode;
use std::time::Duration;
use tower_exit::serve::prefork::Prefork;

fn main() -> ExitCode {
    demo::init_logging();
    let args = demo::parse_args("127.0.0.1:8080", true);
    let mut prefork = Prefork::new(args.listen)
        .workers(args.workers)
        .stop_all_code(args.stop_all_code)
        .grace(Duration::from_secs(10))
        .on_bound(|addr| println!("listening on {addr}"));
    if let Some(max) = args.max_requests {
        prefork = prefork.max_requests(max);
    }
    if let Some((crashes, within)) = args.restart_intensity {
        prefork = prefork.restart_intensity(crashes, within);
    }
    demo::finish(prefork.run_http(demo::service))
}
