//! A client that goes away mid-request: the server drops that request's
//! future (nothing runs on for nobody), reports nothing, and serves on.

mod common;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use std::convert::Infallible;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tower::ServiceBuilder;
use tower_exit::report::Failure;
use tower_exit::{Exit, ServiceBuilderExt, Supervisor};

struct Probe(Arc<AtomicUsize>);
impl Drop for Probe {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_request_drops_its_future_and_the_server_serves_on() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let reports = Arc::new(AtomicUsize::new(0));
    let (d, r) = (dropped.clone(), reports.clone());
    let supervisor = Supervisor::new();
    let svc = ServiceBuilder::new()
        .boundary(&supervisor)
        .catch_panic()
        .report(move |_: &Failure<'_>| {
            r.fetch_add(1, Ordering::SeqCst);
        })
        .service_fn(move |req: Request<tower_exit::serve::http::RequestBody>| {
            let d = d.clone();
            async move {
                if req.uri().path() == "/slow" {
                    let _probe = Probe(d);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("ok")))
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(tower_exit::serve::http(listener, svc, &supervisor).into_future());

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while dropped.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gone client's request still runs"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        reports.load(Ordering::SeqCst),
        0,
        "a client going away is not a failure"
    );
    assert_eq!(
        common::get(addr, "/").await.unwrap().body,
        "ok",
        "serves on"
    );
    supervisor.trigger(Exit::success());
    assert_eq!(server.await.unwrap().unwrap().code(), 0);
}
