//! How an `Exit` is raised: no panic hook; under `panic = "abort"` the
//! process ends with the exit's status after the abort hooks ran, forked
//! children end at the raise with their own hooks only, and `Err(Exit)`
//! still drains a server (a fixture crate built with that profile).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use tower_exit::Exit;

#[test]
fn raising_does_not_run_the_panic_hook_but_panicking_does() {
    static HOOK_CALLS: AtomicUsize = AtomicUsize::new(0);
    std::panic::set_hook(Box::new(|_| {
        HOOK_CALLS.fetch_add(1, Ordering::SeqCst);
    }));
    let payload = std::panic::catch_unwind(|| tower_exit::exit(2)).unwrap_err();
    assert_eq!(Exit::from_panic(&*payload).map(Exit::code), Some(2));
    let payload = std::panic::catch_unwind(|| Exit::failure("stop").raise()).unwrap_err();
    assert_eq!(
        Exit::from_panic(&*payload).and_then(Exit::message),
        Some("stop")
    );
    assert_eq!(HOOK_CALLS.load(Ordering::SeqCst), 0);

    // The counter works: a real panic does run it.
    let _ = std::panic::catch_unwind(|| panic!("real"));
    assert_eq!(HOOK_CALLS.load(Ordering::SeqCst), 1);
    let _ = std::panic::take_hook();
}

/// Builds the `panic = "abort"` fixture crate once; the path of `bin`.
fn abort_fixture(bin: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/abort");
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/abort-fixture");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let built = Command::new(cargo)
            .args(["build", "--quiet", "--bins", "--manifest-path"])
            .arg(fixture.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .expect("cargo runs");
        assert!(built.success(), "fixture builds");
        target.join("debug")
    });
    dir.join(bin)
}

#[test]
fn under_panic_abort_raising_runs_the_hooks_and_exits_with_the_status() {
    let binary = abort_fixture("abort-exit");
    for (code, status) in [(0, 0), (3, 3), (256, 0), (-1, 255)] {
        let out = Command::new(&binary)
            .arg(code.to_string())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(status), "exit({code})");
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stdout, format!("hook 1: exit {code}: bye\nhook 2\n"));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!stderr.contains("panicked"), "no panic message: {stderr}");
    }
}

/// What the fixture's `children MODE` printed, and its status.
fn children(mode: &str) -> String {
    let out = Command::new(abort_fixture("children"))
        .arg(mode)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{mode}: the parent ends normally"
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn under_panic_abort_a_guarded_child_ends_at_the_raise_with_its_own_hooks_only() {
    // Default guard: SIGTERM. `exit_code()`: the exit's status. Either way
    // the child's cleanup hook runs, the parent's abort hook and C atexit
    // handler do not run in the child, and the parent's buffered output is
    // printed once (by the parent), not flushed again by the child.
    for (mode, end) in [
        ("guard", "code=None signal=Some(15)"),
        ("guard-exit-code", "code=Some(5) signal=None"),
        ("spawn", "code=Some(7) signal=None"),
    ] {
        assert_eq!(
            children(mode),
            format!(
                "child cleanup hook\n\
                 unflushed parent output;\n\
                 child ended: {end}\n\
                 C atexit handler\n"
            ),
            "{mode}"
        );
    }
}

#[test]
fn under_panic_abort_a_panicking_spawn_child_ends_with_sigabrt() {
    // No unwinding to catch: the documented status is the abort signal, and
    // no cleanup hook runs.
    assert_eq!(
        children("spawn-panic"),
        "unflushed parent output;\nchild ended: code=None signal=Some(6)\nC atexit handler\n"
    );
}

/// The fixture's server, killed and reaped if a test fails before it ends.
struct Server(std::process::Child);

impl Server {
    fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the fixture's `serve`; the process, its address and the rest of
/// its output.
fn abort_server() -> (Server, SocketAddr, impl Iterator<Item = String>) {
    let mut server = Command::new(abort_fixture("serve"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap);
    let first = lines.next().expect("listening line");
    let port: u16 = first.trim_start_matches("listening on ").parse().unwrap();
    (
        Server(server),
        SocketAddr::from(([127, 0, 0, 1], port)),
        lines,
    )
}

/// One HTTP/1.1 request on a fresh connection: the status line, or the
/// empty string when the connection closed without an answer.
fn status_line(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn under_panic_abort_err_exit_drains_serve_http_as_usual() {
    let (mut server, addr, lines) = abort_server();
    let slow = std::thread::spawn(move || status_line(addr, "/slow"));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        status_line(addr, "/err-exit"),
        "HTTP/1.1 503 Service Unavailable"
    );
    assert_eq!(
        slow.join().unwrap(),
        "HTTP/1.1 200 OK",
        "in flight, answered"
    );
    let status = server.wait();
    assert_eq!(status.code(), Some(3));
    let rest: Vec<String> = lines.collect();
    assert_eq!(rest, ["drained: exit 3"], "no abort hook: nothing aborted");
}

#[test]
fn under_panic_abort_a_raised_exit_ends_the_server_at_once_after_the_abort_hooks() {
    let (mut server, addr, lines) = abort_server();
    let slow = std::thread::spawn(move || status_line(addr, "/slow"));
    std::thread::sleep(Duration::from_millis(100));
    // No unwinding: the process ends in the raise, and the request in
    // flight is cut (documented; use `Err(Exit)` in abort builds).
    assert_eq!(status_line(addr, "/raise-exit"), "");
    assert_eq!(slow.join().unwrap(), "");
    let status = server.wait();
    assert_eq!(status.code(), Some(4));
    let rest: Vec<String> = lines.collect();
    assert_eq!(rest, ["abort hook: exit 4"]);
}
