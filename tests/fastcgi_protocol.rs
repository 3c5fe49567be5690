//! `serve::fastcgi` at the record level, over real TCP connections, with a
//! client written here from the spec (not the crate's own encoder):
//! keep-conn and multiplexing, `FCGI_GET_VALUES`, `FCGI_ABORT_REQUEST`,
//! `FCGI_UNKNOWN_TYPE`, stdin streamed as the body, records of at most
//! 65,535 bytes; and bad input: malformed and truncated records, another
//! version, an unsupported role, oversized params and body, a peer outside
//! the allow-list. After each, the server still serves.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use std::convert::Infallible;
use std::future::IntoFuture;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_exit::serve::fastcgi::{Limits, Params, RemoteAddr, RequestBody};
use tower_exit::Supervisor;

mod common;
use common::fcgi::{
    begin, pairs, partial_post, read_until_end, record, request, response_of, rest_of_partial,
    take_record,
};

// ---------------------------------------------------------------------------
// The server under test.
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Seen {
    dropped: AtomicUsize,
}

/// Drops count into `Seen::dropped`: proves an aborted request's future was dropped.
struct DropProbe(Arc<Seen>);
impl Drop for DropProbe {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

async fn app(
    seen: Arc<Seen>,
    req: Request<RequestBody>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let text = |s: String| Ok(Response::new(Full::from(s)));
    match path.as_str() {
        "/echo" => {
            let header = req
                .headers()
                .get("x-test")
                .map(|v| v.to_str().unwrap().to_owned());
            let remote = req
                .extensions()
                .get::<RemoteAddr>()
                .map(|r| r.0.to_string());
            let proto = req
                .extensions()
                .get::<Params>()
                .and_then(|p| p.get_str("SERVER_PROTOCOL").map(str::to_owned));
            let body = match req.into_body().collect().await {
                Ok(body) => format!("{} bytes", body.to_bytes().len()),
                Err(err) => format!("body error: {err}"),
            };
            text(format!("{header:?} {remote:?} {proto:?} {body}"))
        }
        "/wait" => {
            let _probe = DropProbe(seen);
            std::future::pending::<()>().await;
            unreachable!()
        }
        "/sleep" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            text("slept".into())
        }
        "/big" => text("x".repeat(200_000)),
        "/huge" => text("x".repeat(32 << 20)),
        _ => text("hello".into()),
    }
}

struct Server {
    addr: SocketAddr,
    seen: Arc<Seen>,
}

fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || LogWriter(sink.clone()))
            .init();
        logs
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);
impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_contains(needle: &str) -> bool {
    String::from_utf8_lossy(&logs().lock().unwrap()).contains(needle)
}

async fn server(limits: Limits, allow: Option<Vec<std::net::IpAddr>>) -> Server {
    logs();
    let seen = Arc::new(Seen::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let supervisor = Supervisor::new();
    let app_seen = seen.clone();
    let svc = tower::service_fn(move |req| app(app_seen.clone(), req));
    let mut serve = tower_exit::serve::fastcgi(listener, svc, &supervisor).limits(limits);
    if let Some(allow) = allow {
        serve = serve.allow(allow);
    }
    tokio::spawn(async move {
        let _keep = supervisor;
        serve.await
    });
    Server { addr, seen }
}

/// The server still answers a plain request on a new connection.
async fn still_serves(addr: SocketAddr) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&request(1, false, "/", b""))
        .await
        .unwrap();
    let recs = read_until_end(&mut stream, &[1]).await;
    let (stdout, end) = response_of(&recs, 1);
    assert!(stdout.starts_with("Status: 200 OK\r\n"), "{stdout:?}");
    assert_eq!(end, Some(0));
}

async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

// ---------------------------------------------------------------------------
// Protocol features
// ---------------------------------------------------------------------------

#[tokio::test]
async fn params_become_the_request_and_stdin_streams_as_its_body() {
    let server = server(Limits::default(), None).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let body = vec![7u8; 150_000];
    stream
        .write_all(&request(1, false, "/echo?x=1", &body))
        .await
        .unwrap();
    let (stdout, end) = response_of(&read_until_end(&mut stream, &[1]).await, 1);
    assert_eq!(end, Some(0));
    assert!(
        stdout.ends_with(r#"Some("yes") Some("192.0.2.7:4321") Some("HTTP/1.1") 150000 bytes"#),
        "{stdout:?}"
    );
}

#[tokio::test]
async fn keep_conn_and_multiplexed_requests_on_one_connection() {
    let server = server(Limits::default(), None).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // Two requests interleaved record by record, then a third after them.
    let (a, b) = (request(1, true, "/big", b""), request(2, true, "/", b""));
    stream.write_all(&a[..16]).await.unwrap();
    stream.write_all(&b[..16]).await.unwrap();
    stream.write_all(&a[16..]).await.unwrap();
    stream.write_all(&b[16..]).await.unwrap();
    let recs = read_until_end(&mut stream, &[1, 2]).await;
    let (big, end_a) = response_of(&recs, 1);
    let (hello, end_b) = response_of(&recs, 2);
    assert_eq!((end_a, end_b), (Some(0), Some(0)));
    assert!(big.ends_with(&"x".repeat(200_000)));
    assert!(hello.ends_with("hello"));
    assert!(
        recs.iter().all(|r| r.content.len() <= 65_535),
        "records of at most 65,535 bytes"
    );
    assert!(
        recs.iter().filter(|r| r.id == 1 && r.kind == 6).count() >= 4,
        "the big body spans records"
    );

    stream.write_all(&request(3, true, "/", b"")).await.unwrap();
    let (third, end) = response_of(&read_until_end(&mut stream, &[3]).await, 3);
    assert_eq!(end, Some(0));
    assert!(
        third.ends_with("hello"),
        "keep-conn: the connection serves on"
    );
}

/// Every record the server sends until it closes the connection (or 5 s
/// pass: then `None`).
async fn records_until_closed(stream: &mut TcpStream) -> Option<Vec<common::fcgi::Rec>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return None,
        }
    }
    let mut recs = Vec::new();
    while let Some(rec) = take_record(&mut buf) {
        recs.push(rec);
    }
    assert!(buf.is_empty(), "a partial record before the close");
    Some(recs)
}

/// A server that closes a kept connection (here: it drains) writes a
/// close notice (an empty `FCGI_GET_VALUES_RESULT`) right after the last
/// `FCGI_END_REQUEST`: nginx then drops the connection from its pool
/// instead of sending a next request on it as it closes (a POST sent there
/// would fail 502). A connection the web server did not ask to keep gets
/// no such record.
#[tokio::test]
async fn a_kept_connection_the_server_closes_ends_with_a_close_notice() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let supervisor = Supervisor::new();
    let seen = Arc::new(Seen::default());
    let svc = tower::service_fn(move |req| app(seen.clone(), req));
    let serving =
        tokio::spawn(tower_exit::serve::fastcgi(listener, svc, &supervisor).into_future());

    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(&request(1, true, "/sleep", b""))
        .await
        .unwrap();
    let mut once = TcpStream::connect(addr).await.unwrap();
    once.write_all(&request(2, false, "/sleep", b""))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    supervisor.trigger(tower_exit::Exit::success());

    let recs = records_until_closed(&mut kept)
        .await
        .expect("the kept connection closed");
    let (stdout, end) = response_of(&recs, 1);
    assert!(stdout.ends_with("slept"), "{stdout:?}");
    assert_eq!(end, Some(0));
    let last_two: Vec<_> = recs
        .iter()
        .rev()
        .take(2)
        .map(|r| (r.kind, r.id, r.content.len()))
        .collect();
    assert_eq!(
        last_two,
        [(10, 0, 0), (3, 1, 8)],
        "END_REQUEST, then the notice, then the close: {recs:?}"
    );

    let recs = records_until_closed(&mut once)
        .await
        .expect("the connection closed");
    assert_eq!(response_of(&recs, 2).1, Some(0));
    assert_eq!(
        recs.last().map(|r| (r.kind, r.id)),
        Some((3, 2)),
        "{recs:?}"
    );

    let exit = tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("drained")
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), 0);
}

#[tokio::test]
async fn get_values_is_answered_and_unknown_management_records_get_unknown_type() {
    let limits = Limits::default().max_conns(3).max_requests_per_conn(5);
    let server = server(limits, None).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let asked = pairs(&[
        ("FCGI_MAX_CONNS", ""),
        ("FCGI_MAX_REQS", ""),
        ("FCGI_MPXS_CONNS", ""),
        ("OTHER", ""),
    ]);
    stream.write_all(&record(9, 0, &asked)).await.unwrap();
    stream.write_all(&record(42, 0, b"")).await.unwrap();
    stream
        .write_all(&request(1, false, "/", b""))
        .await
        .unwrap();
    let recs = read_until_end(&mut stream, &[1]).await;
    let values = recs
        .iter()
        .find(|r| r.kind == 10)
        .expect("FCGI_GET_VALUES_RESULT");
    let expected = pairs(&[
        ("FCGI_MAX_CONNS", "3"),
        ("FCGI_MAX_REQS", "15"),
        ("FCGI_MPXS_CONNS", "1"),
    ]);
    assert_eq!(values.content, expected);
    let unknown = recs
        .iter()
        .find(|r| r.kind == 11)
        .expect("FCGI_UNKNOWN_TYPE");
    assert_eq!(unknown.content[0], 42);
}

#[tokio::test]
async fn abort_request_drops_that_request_only() {
    let server = server(Limits::default(), None).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(&request(1, true, "/wait", b""))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.seen.dropped.load(Ordering::SeqCst), 0);
    stream.write_all(&record(2, 1, b"")).await.unwrap();
    stream.write_all(&request(2, true, "/", b"")).await.unwrap();
    let recs = read_until_end(&mut stream, &[1, 2]).await;
    assert_eq!(
        response_of(&recs, 1).1,
        Some(0),
        "the aborted request is ended"
    );
    assert!(response_of(&recs, 2).0.ends_with("hello"));
    assert_eq!(
        server.seen.dropped.load(Ordering::SeqCst),
        1,
        "its future was dropped"
    );
}

#[tokio::test]
async fn abort_in_the_middle_of_a_body_drops_the_request_and_the_connection_serves_on() {
    let server = server(Limits::default(), None).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // Begin and params, then half a body, then the abort.
    stream.write_all(&partial_post(1, "/wait")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(&record(2, 1, b"")).await.unwrap();
    let recs = read_until_end(&mut stream, &[1]).await;
    assert_eq!(response_of(&recs, 1).1, Some(0));
    assert_eq!(
        server.seen.dropped.load(Ordering::SeqCst),
        1,
        "the handler's future was dropped"
    );
    // The rest of that body, still in flight from the web server, is ignored.
    stream.write_all(&rest_of_partial(1)).await.unwrap();
    stream.write_all(&request(2, true, "/", b"")).await.unwrap();
    let (stdout, end) = response_of(&read_until_end(&mut stream, &[2]).await, 2);
    assert!(stdout.ends_with("hello"));
    assert_eq!(end, Some(0));
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

#[tokio::test]
async fn another_version_closes_that_connection_with_a_log_line() {
    let server = server(Limits::default(), None).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let mut bad = request(1, true, "/", b"");
    bad[0] = 2;
    stream.write_all(&bad).await.unwrap();
    assert!(closed_by_server(&mut stream).await);
    assert!(log_contains("unsupported FastCGI version 2"));
    still_serves(server.addr).await;
}

#[tokio::test]
async fn truncated_and_malformed_records_close_the_connection() {
    let server = server(Limits::default(), None).await;
    // Cut inside a record, then the peer goes away.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(&request(1, true, "/", b"")[..20])
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    assert!(closed_by_server(&mut stream).await);
    // Params whose lengths lie.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(&begin(1, 1, true)).await.unwrap();
    stream
        .write_all(&record(4, 1, &[0x85, 0x01]))
        .await
        .unwrap();
    stream.write_all(&record(4, 1, b"")).await.unwrap();
    let (stdout, _) = response_of(&read_until_end(&mut stream, &[1]).await, 1);
    assert!(stdout.starts_with("Status: 400"), "{stdout:?}");
    // A BEGIN_REQUEST body of the wrong size, and a record servers never get.
    for bad in [record(1, 1, &[0, 1]), record(6, 1, b"hi")] {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(&bad).await.unwrap();
        assert!(closed_by_server(&mut stream).await);
    }
    assert!(log_contains("malformed FastCGI input: connection closed"));
    assert!(log_contains("FCGI_BEGIN_REQUEST body is 2 bytes"));
    still_serves(server.addr).await;
}

#[tokio::test]
async fn an_unsupported_role_is_rejected() {
    let server = server(Limits::default(), None).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(&begin(1, 2, false)).await.unwrap();
    let recs = read_until_end(&mut stream, &[1]).await;
    assert_eq!(response_of(&recs, 1).1, Some(3), "FCGI_UNKNOWN_ROLE");
    assert!(log_contains("FastCGI role not supported"));
    still_serves(server.addr).await;
}

#[tokio::test]
async fn oversized_params_and_body_are_rejected() {
    let limits = Limits::default()
        .max_params_bytes(1024)
        .max_body_bytes(10_000);
    let server = server(limits, None).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let huge = "v".repeat(2000);
    stream.write_all(&begin(1, 1, true)).await.unwrap();
    stream
        .write_all(&record(4, 1, &pairs(&[("HTTP_BIG", &huge)])))
        .await
        .unwrap();
    stream.write_all(&record(4, 1, b"")).await.unwrap();
    stream.write_all(&record(5, 1, b"")).await.unwrap();
    let (stdout, _) = response_of(&read_until_end(&mut stream, &[1]).await, 1);
    assert!(stdout.starts_with("Status: 431"), "{stdout:?}");
    assert!(log_contains("FastCGI params larger than the limit"));

    stream
        .write_all(&request(2, true, "/echo", &[1u8; 20_000]))
        .await
        .unwrap();
    let (stdout, _) = response_of(&read_until_end(&mut stream, &[2]).await, 2);
    assert!(
        stdout.ends_with("body error: request body larger than the limit of 10000 bytes"),
        "{stdout:?}"
    );
    assert!(log_contains("FastCGI request body larger than the limit"));
    still_serves(server.addr).await;
}

#[tokio::test]
async fn a_peer_outside_the_allow_list_is_refused() {
    let server = server(Limits::default(), Some(vec!["192.0.2.1".parse().unwrap()])).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(&request(1, false, "/", b""))
        .await
        .unwrap();
    assert!(closed_by_server(&mut stream).await);
    assert!(read_until_end(&mut stream, &[1]).await.is_empty());
    assert!(log_contains("FastCGI peer not in the allow-list"));
}

// ---------------------------------------------------------------------------
// Silent and slow peers (issue 15)
// ---------------------------------------------------------------------------

fn short_timeouts() -> Limits {
    Limits::default()
        .begin_timeout(Duration::from_millis(300))
        .read_timeout(Duration::from_millis(300))
        .idle_timeout(Duration::from_millis(300))
}

/// Waits for the server to close `stream`; how long it took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = std::time::Instant::now();
    assert!(closed_by_server(stream).await, "closed");
    let took = started.elapsed();
    assert!(took < limit, "closed after {took:?}");
    took
}

#[tokio::test]
async fn a_connection_that_never_sends_a_request_is_closed_after_the_begin_timeout() {
    let server = server(short_timeouts(), None).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(2)).await;
    assert!(took >= Duration::from_millis(250), "not before: {took:?}");

    // A BEGIN_REQUEST trickled a byte at a time does not get longer.
    let mut trickle = TcpStream::connect(server.addr).await.unwrap();
    let begin = begin(1, 1, true);
    let started = std::time::Instant::now();
    for byte in begin {
        if trickle.write_all(&[byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed_by_server(&mut trickle).await);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(log_contains("a first FCGI_BEGIN_REQUEST"));
    still_serves(server.addr).await;
}

#[tokio::test]
async fn a_request_whose_params_stall_is_ended_after_the_read_timeout() {
    let server = server(short_timeouts(), None).await;
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    let mut half = begin(1, 1, true);
    half.extend(record(4, 1, &pairs(&[("REQUEST_URI", "/")])));
    stalled.write_all(&half).await.unwrap(); // no empty PARAMS: never ends
    closed_within(&mut stalled, Duration::from_secs(2)).await;

    // A body that stalls halfway: the handler's read fails, the connection
    // is closed.
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(&partial_post(1, "/echo")).await.unwrap();
    closed_within(&mut stalled, Duration::from_secs(2)).await;
    assert!(log_contains("request input (FCGI_PARAMS or FCGI_STDIN)"));
    still_serves(server.addr).await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let server = server(short_timeouts(), None).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(&request(1, true, "/", b"")).await.unwrap();
    let recs = read_until_end(&mut stream, &[1]).await;
    assert_eq!(response_of(&recs, 1).1, Some(0));
    let took = closed_within(&mut stream, Duration::from_secs(2)).await;
    assert!(took >= Duration::from_millis(200), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_connections_do_not_lock_out_a_real_request() {
    // Default limits: 1,024 connection slots, 5 s to send a first request.
    let server = server(Limits::default(), None).await;
    let mut silent = Vec::new();
    for _ in 0..1030 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(&request(1, false, "/", b""))
        .await
        .unwrap();
    let recs = tokio::time::timeout(Duration::from_secs(10), read_until_end(&mut stream, &[1]))
        .await
        .expect("answered within 10 s");
    let (stdout, end) = response_of(&recs, 1);
    assert!(stdout.starts_with("Status: 200 OK\r\n"), "{stdout:?}");
    assert_eq!(end, Some(0));
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(silent);
}

#[tokio::test]
async fn an_ipv4_peer_of_a_dual_stack_listener_matches_its_ipv4_entry() {
    let listener = match tokio::net::TcpListener::bind("[::]:0").await {
        Ok(listener) => listener,
        Err(err) => panic!("this machine has IPv6 on loopback; bind [::]: {err}"),
    };
    let port = listener.local_addr().unwrap().port();
    let supervisor = Supervisor::new();
    let svc = tower::service_fn(|_: Request<RequestBody>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
    });
    let serve = tower_exit::serve::fastcgi(listener, svc, &supervisor)
        .allow(["127.0.0.1".parse().unwrap()]);
    let server = tokio::spawn(serve.into_future());
    // Connected over IPv4: the server sees ::ffff:127.0.0.1.
    still_serves(SocketAddr::from(([127, 0, 0, 1], port))).await;
    supervisor.trigger(tower_exit::Exit::success());
    assert_eq!(server.await.unwrap().unwrap().code(), 0);
}

/// Sends a POST to `/echo` whose stdin comes as `count` records of `chunk`
/// bytes, one every `every`; what came back (the response's stdout, or
/// `None` when the server closed the connection first) and when.
async fn post_trickle(
    addr: SocketAddr,
    chunk: usize,
    every: Duration,
    count: usize,
) -> (Option<String>, Duration) {
    let started = std::time::Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let mut head = begin(1, 1, false);
    let length = (chunk * count).to_string();
    head.extend(record(
        4,
        1,
        &pairs(&[
            ("REQUEST_METHOD", "POST"),
            ("REQUEST_URI", "/echo"),
            ("CONTENT_LENGTH", &length),
        ]),
    ));
    head.extend(record(4, 1, b""));
    writer.write_all(&head).await.unwrap();
    let trickle = async move {
        for i in 0..count {
            if i > 0 {
                tokio::time::sleep(every).await;
            }
            if writer
                .write_all(&record(5, 1, &vec![b'x'; chunk]))
                .await
                .is_err()
            {
                return std::future::pending().await;
            }
        }
        let _ = writer.write_all(&record(5, 1, b"")).await;
        std::future::pending::<()>().await
    };
    let read = async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let got = tokio::select! {
        got = read => got,
        () = trickle => unreachable!(),
    };
    let mut got = got;
    let mut stdout = String::new();
    while let Some(rec) = take_record(&mut got) {
        if rec.kind == 6 {
            stdout.push_str(&String::from_utf8_lossy(&rec.content));
        }
    }
    ((!stdout.is_empty()).then_some(stdout), started.elapsed())
}

#[tokio::test]
async fn stdin_below_the_minimum_rate_ends_the_connection_and_at_the_rate_does_not() {
    let limits = Limits::default().min_request_body_rate(240, Duration::from_secs(1));
    let limited = server(limits, None).await;
    // A byte every 300 ms: closed once the 1 s allowance is spent.
    let (got, took) = post_trickle(limited.addr, 1, Duration::from_millis(300), 20).await;
    assert_eq!(got, None, "answered instead of closed");
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    assert!(log_contains("request input at the minimum rate"));
    // 200 bytes every 500 ms (400 B/s): served.
    let (got, _) = post_trickle(limited.addr, 200, Duration::from_millis(500), 8).await;
    assert!(got.unwrap().ends_with("1600 bytes"));
    // The control: with the rule off, the trickle is served too.
    let off = server(
        Limits::default().min_request_body_rate(0, Duration::ZERO),
        None,
    )
    .await;
    let (got, took) = post_trickle(off.addr, 1, Duration::from_millis(300), 20).await;
    assert!(got.unwrap().ends_with("20 bytes"));
    assert!(took > Duration::from_secs(5), "{took:?}");
}

/// Asks for `/huge` (32 MiB), reads nothing for 3 s, then reads what
/// comes; how many bytes came before the connection closed.
async fn huge_read_late(addr: SocketAddr) -> usize {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&request(1, false, "/huge", b""))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return total,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("neither closed nor sending after {total} bytes"),
        }
    }
}

#[tokio::test]
async fn a_web_server_that_stops_reading_a_response_is_cut_at_the_minimum_rate() {
    // 1 MB/s after 1 s: a peer that takes nothing is cut once the socket's
    // buffers are full and 1 s (plus 64 KiB at the rate) has passed.
    let limits = Limits::default().min_response_rate(1_000_000, Duration::from_secs(1));
    let limited = server(limits, None).await;
    let got = huge_read_late(limited.addr).await;
    assert!(got < 32 << 20, "the whole response came: {got} bytes");
    assert!(log_contains("slower than the minimum rate"));
    // The control: with the rule off, the response comes whole.
    let off = server(Limits::default().min_response_rate(0, Duration::ZERO), None).await;
    let got = huge_read_late(off.addr).await;
    assert!(got > 32 << 20, "{got} bytes");
}
