//! Shared by the integration tests: a real HTTP client and a handler that
//! ends in every way a handler can.
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use tower::BoxError;
use tower_exit::Exit;

/// One HTTP/1.1 exchange over a fresh TCP connection.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

pub async fn get(addr: SocketAddr, path: &str) -> Result<Reply, BoxError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let res = sender.send_request(req).await?;
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

async fn nested_exit(code: i32) -> Response<Full<Bytes>> {
    tokio::task::yield_now().await;
    tower_exit::exit(code)
}

/// `/ok`, `/fail`, `/panic`, `/exit/N` (raised), `/nested/N` (raised in a
/// nested async fn), `/spawn/N` (raised in `tokio::spawn`), `/blocking/N`
/// (raised in `spawn_blocking`), `/err/N` (returned as `Err`), `/io/N`
/// (returned inside an `io::Error`), `/slow` (answers after 300 ms).
pub async fn handler<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, BoxError> {
    let path = req.uri().path().to_owned();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let route = parts.next().unwrap_or_default();
    let code = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    match route {
        "ok" => Ok(Response::new(Full::from("ok"))),
        "fail" => Err("database is down".into()),
        "panic" => panic!("bug in handler"),
        "exit" => tower_exit::exit(code),
        "nested" => Ok(nested_exit(code).await),
        "spawn" => {
            let handle = tokio::spawn(async move { nested_exit(code).await });
            Ok(tower_exit::exit::join(handle)
                .await
                .map_err(|failure| format!("{failure:?}"))?)
        }
        "blocking" => {
            let handle = tokio::task::spawn_blocking(move || -> Response<Full<Bytes>> {
                tower_exit::exit(code)
            });
            Ok(tower_exit::exit::join(handle)
                .await
                .map_err(|failure| format!("{failure:?}"))?)
        }
        "err" => Err(Exit::new(code).into()),
        "io" => Err(std::io::Error::other(Exit::new(code)).into()),
        "slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(Response::new(Full::from("slow")))
        }
        _ => {
            let mut res = Response::new(Full::from("not found"));
            *res.status_mut() = StatusCode::NOT_FOUND;
            Ok(res)
        }
    }
}

/// Every way a handler can exit, with code 3.
pub const EXIT_ROUTES: [&str; 6] = [
    "/exit/3",
    "/nested/3",
    "/spawn/3",
    "/blocking/3",
    "/err/3",
    "/io/3",
];
