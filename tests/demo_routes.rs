//! The demo apps end to end, with real peers: `examples/http` through a
//! real HTTP client (TCP and unix socket), `examples/fastcgi` through nginx
//! `fastcgi_pass` (TCP and unix socket) and through `cgi-fcgi`. Every
//! route behaves as documented, and `/exit/N` while `/slow` is in flight
//! lets `/slow` finish with 200 before the process exits with N.

mod common;

use common::demo::{cgi_fcgi, example, nginx, Proc, TempDir};
use common::Reply;
use http::StatusCode;
use std::future::Future;
use std::pin::Pin;
use std::process::Command;
use std::time::Duration;

type Get = Box<dyn Fn(&'static str) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

fn tcp_client(addr: std::net::SocketAddr) -> Get {
    Box::new(move |path| Box::pin(async move { common::get(addr, path).await.expect("response") }))
}

fn unix_client(path: std::path::PathBuf) -> Get {
    Box::new(move |uri| {
        let path = path.clone();
        Box::pin(async move { common::get_unix(&path, uri).await.expect("response") })
    })
}

/// Every route, then `/exit/N` during `/slow`: the process must exit with N.
async fn check_routes(app: &mut Proc, get: Get, code: i32) {
    let hello = get("/").await;
    assert_eq!(
        (hello.status, hello.body.as_str()),
        (StatusCode::OK, "hello\n")
    );
    assert_eq!(get("/nope").await.status, StatusCode::NOT_FOUND);

    assert_eq!(get("/fail").await.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        get("/panic").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );

    let forked = get("/fork").await;
    assert_eq!(forked.status, StatusCode::OK);
    assert!(forked.body.contains("exit status: 0"), "{}", forked.body);
    app.wait_for_line("child ");

    let get = std::sync::Arc::new(get);
    let slow = tokio::spawn({
        let get = get.clone();
        async move { get("/slow").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let exit_path: &'static str = Box::leak(format!("/exit/{code}").into_boxed_str());
    let exited = get(exit_path).await;
    assert_eq!(exited.status, StatusCode::SERVICE_UNAVAILABLE);
    let slow = slow.await.unwrap();
    assert_eq!(
        (slow.status, slow.body.as_str()),
        (StatusCode::OK, "slow\n"),
        "in flight: finished"
    );

    let status = tokio::task::block_in_place(|| app.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(code));
    // Each real failure reported exactly once; the exit never.
    assert_eq!(app.stderr_count("service failed"), 1);
    assert_eq!(app.stderr_count("service panicked"), 1);
    assert_eq!(
        app.stderr_count("ERROR"),
        2,
        "{:?}",
        app.stderr.lock().unwrap()
    );
}

fn spawn_example(name: &str, listen: &str) -> Proc {
    let mut command = Command::new(example(name));
    command.args(["--listen", listen]);
    Proc::spawn(command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_demo_over_tcp() {
    let mut app = spawn_example("http", "127.0.0.1:0");
    let addr = app.wait_for_line("listening on ").parse().unwrap();
    check_routes(&mut app, tcp_client(addr), 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_demo_over_a_unix_socket() {
    let dir = TempDir::new("http-unix");
    let socket = dir.0.join("app.sock");
    let mut app = spawn_example("http", &format!("unix:{}", socket.display()));
    app.wait_for_line("listening on ");
    check_routes(&mut app, unix_client(socket), 9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastcgi_demo_behind_nginx_over_tcp() {
    let dir = TempDir::new("nginx-tcp");
    let mut app = spawn_example("fastcgi", "127.0.0.1:0");
    let upstream = app.wait_for_line("listening on ");
    let (_nginx, port) = nginx(&dir, &upstream);
    check_routes(&mut app, tcp_client(([127, 0, 0, 1], port).into()), 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastcgi_demo_behind_nginx_over_a_unix_socket() {
    let dir = TempDir::new("nginx-unix");
    let socket = dir.0.join("app.sock");
    let mut app = spawn_example("fastcgi", &format!("unix:{}", socket.display()));
    app.wait_for_line("listening on ");
    let (_nginx, port) = nginx(&dir, &format!("unix:{}", socket.display()));
    check_routes(&mut app, tcp_client(([127, 0, 0, 1], port).into()), 5).await;
}

#[test]
fn fastcgi_demo_through_cgi_fcgi() {
    let mut app = spawn_example("fastcgi", "127.0.0.1:0");
    let addr = app.wait_for_line("listening on ");
    let hello = cgi_fcgi(&addr, "GET", "/");
    assert!(hello.starts_with("Status: 200 OK\r\n"), "{hello:?}");
    assert!(hello.ends_with("\r\n\r\nhello\n"), "{hello:?}");
    assert!(cgi_fcgi(&addr, "GET", "/fail").starts_with("Status: 500"));
    assert!(cgi_fcgi(&addr, "GET", "/panic").starts_with("Status: 500"));
    assert!(cgi_fcgi(&addr, "GET", "/fork").contains("exit status: 0"));
    let slow = std::thread::spawn({
        let addr = addr.clone();
        move || cgi_fcgi(&addr, "GET", "/slow")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(cgi_fcgi(&addr, "GET", "/exit/6").starts_with("Status: 503"));
    assert!(slow.join().unwrap().starts_with("Status: 200 OK"));
    assert_eq!(app.wait_exit(Duration::from_secs(15)).code(), Some(6));
    assert_eq!(app.stderr_count("ERROR"), 2);
}

/// `curl` over the unix socket `socket` as user `www-data` (as nginx runs):
/// the HTTP status, or `Err` with curl's exit code when it cannot connect.
fn get_as_www_data(socket: &std::path::Path) -> Result<String, Option<i32>> {
    let out = Command::new("runuser")
        .args(["-u", "www-data", "--", "curl", "-s", "-o", "/dev/null"])
        .args(["-w", "%{http_code}", "--max-time", "5", "--unix-socket"])
        .arg(socket)
        .arg("http://localhost/")
        .output()
        .expect("runuser and curl (.ci/test installs curl)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(out.status.code())
    }
}

/// php-fpm's `listen.mode` and `listen.group`: a socket of mode 0660 in
/// `www-data`'s group lets nginx's user connect; the same mode in root's
/// group refuses it. Needs root (to run a client as another user), as CI.
#[test]
fn a_0660_socket_of_the_front_servers_group_lets_it_in_and_no_other() {
    // SAFETY: plain syscall, no arguments.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a client as www-data");
        return;
    }
    let dir = TempDir::new("socket-mode");
    for (group, expected) in [
        (Some("www-data"), Ok("200".to_owned())),
        (None, Err(Some(7))),
    ] {
        let socket = dir.0.join("app.sock");
        let mut command = Command::new(example("http"));
        command
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()));
        command.args(["--socket-mode", "660"]);
        if let Some(group) = group {
            command.args(["--socket-group", group]);
        }
        let app = Proc::spawn(command);
        app.wait_for_line("listening on ");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660, "{group:?}");
        // curl's 7: could not connect (EACCES).
        assert_eq!(get_as_www_data(&socket), expected, "group {group:?}");
        drop(app);
        let _ = std::fs::remove_file(&socket);
    }
}
