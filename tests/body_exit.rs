//! An exit raised (or returned as the error) in a streamed response body,
//! after the head and a first frame were sent, is taken by the server: it
//! drains and resolves with the exit; the response ends after the bytes
//! already sent (HTTP/1: the connection closes; HTTP/2: that stream is
//! reset, the others go on). Under `serve::http` (with the one-layer
//! stack, and with no exit-aware layer at all), `serve::fastcgi` and
//! `axum::serve` through `serve::graceful`.

mod common;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{BoxError, ServiceBuilder};
use tower_exit::{Exit, Supervisor};

/// How the body's second frame ends the work.
#[derive(Clone, Copy, Debug)]
enum Ends {
    Raised,
    Returned,
}

/// "first\n", then (after a short wait, so the first frame is on the wire)
/// an exit with status 7.
struct ExitingBody {
    ends: Ends,
    step: u8,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for ExitingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.step == 0 {
            self.step = 1;
            self.wait = Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first\n")))));
        }
        if let Some(wait) = self.wait.as_mut() {
            std::task::ready!(wait.as_mut().poll(cx));
        }
        match self.ends {
            Ends::Raised => tower_exit::exit(7),
            Ends::Returned => Poll::Ready(Some(Err(Box::new(Exit::new(7))))),
        }
    }
}

type Body2 = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// `/body-exit` streams an `ExitingBody`; `/slow` answers after 300 ms.
async fn handler<B>(req: Request<B>, ends: Ends) -> Result<Response<Body2>, BoxError> {
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_millis(300)).await;
        return Ok(Response::new(
            Full::from("slow").map_err(Into::into).boxed(),
        ));
    }
    let body = ExitingBody {
        ends,
        step: 0,
        wait: None,
    };
    Ok(Response::new(body.boxed()))
}

/// Sends `path` on `sender`; the status, and what the body gave before it
/// ended (`Ok` whole, `Err` cut).
async fn fetch<S>(send: S) -> (StatusCode, Result<String, String>)
where
    S: std::future::Future<Output = hyper::Result<Response<hyper::body::Incoming>>>,
{
    let res = send.await.expect("the head is sent before the body");
    let status = res.status();
    let mut body = res.into_body();
    let mut got = Vec::new();
    loop {
        match body.frame().await {
            None => return (status, Ok(String::from_utf8_lossy(&got).into_owned())),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
            }
            Some(Err(_)) => return (status, Err(String::from_utf8_lossy(&got).into_owned())),
        }
    }
}

async fn http1(addr: SocketAddr, path: &str) -> (StatusCode, Result<String, String>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    fetch(sender.send_request(req)).await
}

async fn server_exit(server: tokio::task::JoinHandle<std::io::Result<Exit>>) -> i32 {
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server drains and ends")
        .unwrap()
        .unwrap()
        .code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_in_a_streamed_body_ends_serve_http_with_its_code() {
    for ends in [Ends::Raised, Ends::Returned] {
        for stacked in [true, false] {
            let supervisor = Supervisor::new();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let service = tower::service_fn(move |req| handler(req, ends));
            let server = if stacked {
                let svc = ServiceBuilder::new()
                    .layer(supervisor.stack())
                    .service(service);
                tokio::spawn(tower_exit::serve::http(listener, svc, &supervisor).into_future())
            } else {
                tokio::spawn(tower_exit::serve::http(listener, service, &supervisor).into_future())
            };
            let slow = tokio::spawn(http1(addr, "/slow"));
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (status, body) = http1(addr, "/body-exit").await;
            assert_eq!(status, StatusCode::OK, "{ends:?} stacked={stacked}");
            assert_eq!(
                body,
                Err("first\n".to_owned()),
                "{ends:?} stacked={stacked}: the bytes sent, then a cut"
            );
            assert_eq!(
                slow.await.unwrap(),
                (StatusCode::OK, Ok("slow".to_owned())),
                "{ends:?} stacked={stacked}: in flight, answered"
            );
            assert_eq!(server_exit(server).await, 7, "{ends:?} stacked={stacked}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_in_a_streamed_body_resets_only_its_http2_stream() {
    let supervisor = Supervisor::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = ServiceBuilder::new()
        .layer(supervisor.stack())
        .service(tower::service_fn(|req| handler(req, Ends::Raised)));
    let server = tokio::spawn(tower_exit::serve::http(listener, svc, &supervisor).into_future());
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let get = move |path: &str| {
        Request::get(format!("http://{addr}{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let mut slow_sender = sender.clone();
    let slow = tokio::spawn(async move { fetch(slow_sender.send_request(get("/slow"))).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut sender = sender;
    let (status, body) = fetch(sender.send_request(get("/body-exit"))).await;
    assert_eq!((status, body), (StatusCode::OK, Err("first\n".to_owned())));
    assert_eq!(
        slow.await.unwrap(),
        (StatusCode::OK, Ok("slow".to_owned())),
        "the other stream of the connection goes on"
    );
    assert_eq!(server_exit(server).await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_in_a_streamed_body_ends_serve_fastcgi_with_its_code() {
    use common::fcgi;
    use tokio::io::AsyncWriteExt;
    for ends in [Ends::Raised, Ends::Returned] {
        let supervisor = Supervisor::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = ServiceBuilder::new()
            .layer(supervisor.stack())
            .service(tower::service_fn(move |req| handler(req, ends)));
        let server =
            tokio::spawn(tower_exit::serve::fastcgi(listener, svc, &supervisor).into_future());
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(&fcgi::request(1, false, "/body-exit", b""))
            .await
            .unwrap();
        let recs = fcgi::read_until_end(&mut stream, &[1]).await;
        let (stdout, _) = fcgi::response_of(&recs, 1);
        assert!(stdout.contains("first\n"), "{ends:?}: {stdout:?}");
        assert_eq!(server_exit(server).await, 7, "{ends:?}");
    }
}

#[cfg(feature = "axum")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_raised_in_a_streamed_body_ends_axum_serve_with_its_code() {
    let supervisor = Supervisor::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route(
            "/body-exit",
            axum::routing::get(|| async {
                axum::body::Body::new(ExitingBody {
                    ends: Ends::Raised,
                    step: 0,
                    wait: None,
                })
            }),
        )
        .route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "slow"
            }),
        )
        .layer(supervisor.stack());
    let server = tokio::spawn(
        tower_exit::serve::graceful(&supervisor, |shutdown| {
            axum::serve(listener, app).with_graceful_shutdown(shutdown)
        })
        .into_future(),
    );
    let slow = tokio::spawn(http1(addr, "/slow"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, body) = http1(addr, "/body-exit").await;
    assert_eq!((status, body), (StatusCode::OK, Err("first\n".to_owned())));
    assert_eq!(slow.await.unwrap(), (StatusCode::OK, Ok("slow".to_owned())));
    assert_eq!(server_exit(server).await, 7);
}
