//! The boundary behind a real hyper server, driven by a real hyper client:
//! an exit is answered, in-flight requests finish, the server drains and
//! resolves to the exit.

mod common;

use common::{get, handler, EXIT_ROUTES};
use http::StatusCode;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_exit::report::Failure;
use tower_exit::{ServiceBuilderExt, Supervisor};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_drains_the_server_and_becomes_its_result() {
    for path in EXIT_ROUTES {
        let reports = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = reports.clone();
        let supervisor = Supervisor::new();
        let svc = ServiceBuilder::new()
            .boundary(&supervisor)
            .catch_panic()
            .report(move |f: &Failure<'_>| sink.lock().unwrap().push(f.to_string()))
            .service_fn(handler);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tower_exit::serve::http(listener, svc, &supervisor)
                .grace(Duration::from_secs(5))
                .into_future(),
        );

        assert_eq!(get(addr, "/ok").await.unwrap().status, StatusCode::OK);
        let panicked = get(addr, "/panic").await.unwrap();
        assert_eq!(panicked.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(reports.lock().unwrap().len(), 1);

        let slow = tokio::spawn(get(addr, "/slow"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let exited = get(addr, path).await.unwrap();
        assert_eq!(exited.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(exited.headers["connection"], "close");

        let slow = slow.await.unwrap().unwrap();
        assert_eq!((slow.status, slow.body.as_str()), (StatusCode::OK, "slow"));

        let exit = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server drains")
            .unwrap()
            .unwrap();
        assert_eq!(exit.code(), 3, "{path}");
        assert!(get(addr, "/ok").await.is_err(), "no longer accepting");
        assert_eq!(
            reports.lock().unwrap().len(),
            1,
            "{path}: exit not reported"
        );
    }
}

// ---------------------------------------------------------------------------
// Silent and slow clients, the connection cap, unix sockets (issue 15)
// ---------------------------------------------------------------------------

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_exit::serve::{ListenAddr, Listener};

type Svc = tower::util::BoxCloneService<
    http::Request<tower_exit::serve::http::RequestBody>,
    http::Response<http_body_util::Full<bytes::Bytes>>,
    tower::BoxError,
>;
type Server = tokio::task::JoinHandle<std::io::Result<tower_exit::Exit>>;

/// `common::handler` served with `configure`d options.
async fn ok_server(
    configure: impl FnOnce(tower_exit::serve::ServeHttp<Svc>) -> tower_exit::serve::ServeHttp<Svc>,
) -> (std::net::SocketAddr, Supervisor, Server) {
    let supervisor = Supervisor::new();
    let svc = tower::util::BoxCloneService::new(ServiceBuilder::new().service_fn(handler));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = configure(tower_exit::serve::http(listener, svc, &supervisor));
    (addr, supervisor, tokio::spawn(serve.into_future()))
}

/// Waits until the server closes `stream`; how long that took.
async fn closed_after(stream: &mut tokio::net::TcpStream) -> Duration {
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("not closed within 10 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_partial_and_byte_a_second_clients_are_closed_at_the_header_timeout() {
    let timeout = Duration::from_millis(500);
    let (addr, supervisor, server) = ok_server(|s| s.header_read_timeout(timeout)).await;

    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut trickle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let trickling = tokio::spawn(async move {
        for byte in b"GET /ok HTTP/1.1\r\nhost: x\r\nx-slow: yes\r\n\r\n" {
            if trickle.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        closed_after(&mut trickle).await
    });
    for (name, took) in [
        ("silent", closed_after(&mut silent).await),
        ("partial header", closed_after(&mut partial).await),
    ] {
        assert!(took < Duration::from_secs(2), "{name}: {took:?}");
    }
    // The trickle started first; it is closed long before its 4.3 s of header.
    trickling.await.unwrap();
    // A keep-alive connection left idle is closed the same way.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let took = closed_after(&mut idle).await;
    assert!(took < Duration::from_secs(2), "idle keep-alive: {took:?}");
    // And the server serves on.
    assert_eq!(get(addr, "/ok").await.unwrap().status, StatusCode::OK);
    supervisor.trigger(tower_exit::Exit::success());
    assert_eq!(server.await.unwrap().unwrap().code(), 0);
}

/// A body that sends `frames` chunks, one every `every`.
struct Trickle {
    frames: u32,
    every: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for Trickle {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::future::Future;
        if self.frames == 0 {
            return std::task::Poll::Ready(None);
        }
        std::task::ready!(self.sleep.as_mut().poll(cx));
        self.frames -= 1;
        let next = tokio::time::Instant::now() + self.every;
        self.sleep.as_mut().reset(next);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
            b"x",
        )))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handlers_and_slow_bodies_outlive_the_header_timeout() {
    let timeout = Duration::from_millis(100);
    let supervisor = Supervisor::new();
    let svc = tower::service_fn(
        |req: http::Request<tower_exit::serve::http::RequestBody>| async move {
            let path = req.uri().path().to_owned();
            let body = if path == "/stream" {
                // 6 chunks, 100 ms apart: 600 ms of body, six periods.
                Trickle {
                    frames: 6,
                    every: Duration::from_millis(100),
                    sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
                }
            } else {
                // 500 ms in the handler before any byte of the answer.
                tokio::time::sleep(Duration::from_millis(500)).await;
                Trickle {
                    frames: 1,
                    every: Duration::ZERO,
                    sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
                }
            };
            Ok::<_, std::convert::Infallible>(http::Response::new(body))
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tower_exit::serve::http(listener, svc, &supervisor)
            .header_read_timeout(timeout)
            .into_future(),
    );
    let stream = get(addr, "/stream").await.unwrap();
    assert_eq!(
        (stream.status, stream.body.as_str()),
        (StatusCode::OK, "xxxxxx")
    );
    let slow = get(addr, "/slow").await.unwrap();
    assert_eq!((slow.status, slow.body.as_str()), (StatusCode::OK, "x"));

    // On one keep-alive connection: a pause shorter than the timeout keeps
    // it, a slow handler in flight keeps it, a pause of three periods ends
    // it.
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for (pause, path) in [(50, "/slow"), (80, "/stream")] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"0\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "{path}: closed mid-answer: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "{path}");
    }
    let took = closed_after(&mut conn).await;
    assert!(took < Duration::from_secs(1), "idle: {took:?}");
    supervisor.trigger(tower_exit::Exit::success());
    assert_eq!(server.await.unwrap().unwrap().code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let (addr, supervisor, server) = ok_server(|s| {
        s.max_connections(4)
            .header_read_timeout(Duration::from_millis(800))
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A fifth client is not served while four connections hold every slot;
    // it is once the silent ones are closed at their header timeout.
    let started = std::time::Instant::now();
    let reply = get(addr, "/ok").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "served at once: {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    drop(held);
    supervisor.trigger(tower_exit::Exit::success());
    assert_eq!(server.await.unwrap().unwrap().code(), 0);
}

#[tokio::test]
async fn a_live_unix_socket_is_kept_and_a_stale_one_replaced() {
    let dir = std::env::temp_dir().join(format!("tower-exit-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("app.sock");
    let addr = ListenAddr::Unix(path.clone());

    let first = Listener::bind(&addr).await.unwrap();
    let supervisor = Supervisor::new();
    let server = tokio::spawn(
        tower_exit::serve::http(
            first,
            ServiceBuilder::new().service_fn(handler),
            &supervisor,
        )
        .into_future(),
    );
    // A second server on the same path refuses, naming it; the first
    // keeps its socket and serves on.
    let err = Listener::bind(&addr).await.expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert_eq!(
        err.to_string(),
        format!(
            "cannot listen on unix:{}: a server is listening there",
            path.display()
        )
    );
    assert_eq!(
        common::get_unix(&path, "/ok").await.unwrap().status,
        StatusCode::OK
    );

    // A clean exit removes the socket file.
    supervisor.trigger(tower_exit::Exit::success());
    assert_eq!(server.await.unwrap().unwrap().code(), 0);
    assert!(!path.exists(), "socket removed");

    // A stale socket (its server gone without removing it) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let again = Listener::bind(&addr).await.expect("stale socket replaced");
    drop(again);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_bind_error_names_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = Listener::bind(&ListenAddr::Tcp(addr.clone()))
        .await
        .expect_err("in use");
    assert!(
        err.to_string()
            .starts_with(&format!("cannot listen on {addr}: ")),
        "{err}"
    );
}

/// A service that is not ready at once is called through a clone once
/// ready (the server calls a ready service in place); one whose
/// `poll_ready` raises an exit ends the server with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_not_ready_at_once_are_waited_for_and_an_exit_in_poll_ready_is_kept() {
    // One request at a time: the second waits for the first's permit.
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        .concurrency_limit(1)
        .service_fn(handler);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(tower_exit::serve::http(listener, svc, &supervisor).into_future());
    let started = std::time::Instant::now();
    let first = tokio::spawn(get(addr, "/slow"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // (A clone waiting behind the original's place in the semaphore's
    // queue would hang here.)
    let second = tokio::time::timeout(Duration::from_secs(10), get(addr, "/slow"))
        .await
        .expect("the second request is answered")
        .unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        (first.status, second.status),
        (StatusCode::OK, StatusCode::OK)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "not one at a time: {:?}",
        started.elapsed()
    );
    supervisor.trigger(tower_exit::Exit::success());
    assert_eq!(server.await.unwrap().unwrap().code(), 0);

    // `poll_ready` raises exit(6) on the second request.
    #[derive(Clone)]
    struct ExitsWhenReady(Arc<std::sync::atomic::AtomicU32>);
    impl tower::Service<http::Request<tower_exit::serve::http::RequestBody>> for ExitsWhenReady {
        type Response = http::Response<String>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            if self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                tower_exit::exit(6);
            }
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<tower_exit::serve::http::RequestBody>) -> Self::Future {
            std::future::ready(Ok(http::Response::new("ok".to_owned())))
        }
    }
    let supervisor = Supervisor::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = ExitsWhenReady(Arc::default());
    let server = tokio::spawn(tower_exit::serve::http(listener, svc, &supervisor).into_future());
    assert_eq!(get(addr, "/").await.unwrap().status, StatusCode::OK);
    let exited = get(addr, "/").await.unwrap();
    assert_eq!(exited.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.await.unwrap().unwrap().code(), 6);
}

/// A server error of its own type, as tonic's `transport::Error` is.
#[derive(Debug, thiserror::Error)]
#[error("transport failed")]
struct TransportError;

#[tokio::test(flavor = "current_thread")]
async fn serve_graceful_takes_a_server_whose_error_is_not_io() {
    // Drains on the exit and resolves to it.
    let supervisor = Supervisor::new();
    let server = tower_exit::serve::graceful(&supervisor, |shutdown| async move {
        shutdown.await;
        Ok::<(), TransportError>(())
    });
    supervisor.trigger(tower_exit::Exit::new(3));
    assert_eq!(server.await.unwrap().code(), 3);

    // The server's own failure comes back as an io::Error wrapping it.
    let supervisor = Supervisor::new();
    let failed = tower_exit::serve::graceful(&supervisor, |_shutdown| async {
        Err::<(), _>(TransportError)
    })
    .await
    .unwrap_err();
    assert_eq!(failed.kind(), std::io::ErrorKind::Other);
    assert!(failed
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TransportError>())
        .is_some());
}

/// RFC 8441: an HTTP/2 client opens a tunnel with extended CONNECT
/// (`:protocol`, as WebSocket over HTTP/2 does); the service answers 200
/// and echoes what comes through the upgraded stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_connect_over_http2_opens_a_tunnel() {
    use http_body_util::Empty;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new().layer(supervisor.stack()).service_fn(
        |mut req: http::Request<tower_exit::serve::http::RequestBody>| async move {
            let protocol = req.extensions().get::<hyper::ext::Protocol>().cloned();
            assert_eq!(req.method(), http::Method::CONNECT);
            assert_eq!(protocol.as_ref().map(|p| p.as_str()), Some("echo"));
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = hyper_util::rt::TokioIo::new(upgrade.await.unwrap());
                let mut buf = [0u8; 5];
                io.read_exact(&mut buf).await.unwrap();
                io.write_all(&buf).await.unwrap();
            });
            Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<bytes::Bytes>::new()))
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(tower_exit::serve::http(listener, svc, &supervisor).into_future());
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::connect(format!("http://{addr}/tunnel"))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("echo"));
    let mut res = sender.send_request(req).await.expect("CONNECT accepted");
    assert_eq!(res.status(), StatusCode::OK);
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(&mut res).await.unwrap());
    io.write_all(b"hello").await.unwrap();
    let mut echoed = [0u8; 5];
    io.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"hello");
    supervisor.trigger(tower_exit::Exit::success());
    drop(io);
    assert_eq!(server.await.unwrap().unwrap().code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_waits_for_the_shutdown_delay_only_when_asked() {
    for delay_exits in [false, true] {
        let (addr, supervisor, server) = ok_server(|s| {
            s.shutdown_delay(Duration::from_millis(600))
                .delay_exits(delay_exits)
        })
        .await;
        let started = std::time::Instant::now();
        supervisor.trigger(tower_exit::Exit::new(4));
        assert!(!supervisor.ready());
        if delay_exits {
            // In the delay: still accepting, answering, and closing.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let reply = get(addr, "/ok").await.unwrap();
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.headers["connection"], "close");
        }
        let exit = server.await.unwrap().unwrap();
        assert_eq!(exit.code(), 4);
        let took = started.elapsed();
        if delay_exits {
            assert!(took >= Duration::from_millis(600), "drained after {took:?}");
        } else {
            assert!(took < Duration::from_millis(500), "delayed: {took:?}");
        }
    }
}
