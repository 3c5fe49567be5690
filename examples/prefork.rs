//! The demo routes on a prefork server, with `/pid` (the worker's pid),
//! `/hang` (blocks its worker's thread, never answers), `/grow/MIB`
//! (allocates and keeps MIB MiB) and `/big/MIB` (a body of MIB MiB, at
//! most 8, from one shared buffer):
//!
//! `cargo run --example prefork -- --listen 127.0.0.1:8080 --workers 4 --max-requests 1000 --timeout 30 --max-rss 512`
//!
//! Without `--listen`, under systemd socket activation (`LISTEN_FDS`), it
//! serves on the socket systemd passes and tells systemd when it is ready
//! (`NOTIFY_SOCKET`).
//!
//! The master forks the workers before any runtime exists. A worker
//! recycles itself after `--max-requests`; `/exit/N` with N the
//! `--stop-all-code` (default 3) ends the whole server with N; any other
//! `/exit/N` ends that worker, which the master replaces. SIGTERM drains,
//! SIGINT stops at once, SIGHUP replaces every worker, SIGTTIN/SIGTTOU add
//! or remove one. `--restart-intensity N/SECS` stops the server (status 1)
//! when workers fail N times within SECS seconds. `--fastcgi` serves
//! FastCGI instead of HTTP, for nginx's `fastcgi_pass` (php-fpm's place).

mod demo;

use std::process::ExitCode;
use std::time::Duration;
use tower_exit::serve::fastcgi::RequestBody;
use tower_exit::serve::prefork::Prefork;

/// One line to stderr in one `write`: the master and its workers share the
/// pipe, and `eprintln!` writes a line in pieces that another process's
/// output could split.
fn say(line: String) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(line.as_bytes());
}

fn main() -> ExitCode {
    demo::init_logging();
    let args = demo::parse_args("127.0.0.1:8080", true);
    let prefork = if !args.listen_given && Prefork::is_socket_activated() {
        Prefork::socket_activated()
    } else {
        Ok(Prefork::new(args.listen))
    };
    let prefork = match prefork {
        Ok(prefork) => prefork,
        Err(err) => return demo::finish(Err(err)),
    };
    let mut prefork = prefork
        .workers(args.workers)
        .socket_owner(None, args.socket_group)
        .stop_all_code(args.stop_all_code)
        .grace(Duration::from_secs(10))
        .shutdown_delay(args.shutdown_delay)
        .on_bound(|addr| println!("listening on {addr}"))
        // The hooks, visible: in the master before each fork, in each new
        // worker (a fresh single-threaded process: printing is safe), and
        // in the master once a worker was reaped.
        .before_fork(|| say("hook: forking a worker\n".into()))
        .worker_started(|| say(format!("hook: worker {} started\n", std::process::id())))
        .worker_ended(|pid, status| say(format!("hook: worker {pid} ended: {status}\n")));
    if let Some(max) = args.max_requests {
        prefork = prefork.max_requests(max);
    }
    if let Some((crashes, within)) = args.restart_intensity {
        prefork = prefork.restart_intensity(crashes, within);
    }
    if let Some(jitter) = args.max_requests_jitter {
        prefork = prefork.max_requests_jitter(jitter);
    }
    if let Some(timeout) = args.timeout {
        prefork = prefork.timeout(timeout);
    }
    if let Some(mib) = args.max_rss_mib {
        prefork = prefork.max_rss(mib << 20);
    }
    if let Some(window) = args.rollback_window {
        prefork = prefork.rollback_window(window);
    }
    if let Some(mode) = args.socket_mode {
        prefork = prefork.socket_mode(mode);
    }
    if let Some((bytes_per_sec, grace)) = args.min_response_rate {
        prefork = prefork.min_response_rate(bytes_per_sec, grace);
    }
    if let Some((bytes_per_sec, grace)) = args.min_request_body_rate {
        prefork = prefork.min_request_body_rate(bytes_per_sec, grace);
    }
    if args.fastcgi {
        // Behind nginx (`fastcgi_pass`), php-fpm's place.
        return demo::finish(prefork.run_fastcgi(demo::service::<RequestBody>));
    }
    demo::finish(prefork.run_http(demo::service))
}
