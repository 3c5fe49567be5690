//! `FCGI_ABORT_REQUEST` racing with requests on one connection: random
//! interleavings of BEGIN (with PARAMS and STDIN) and ABORT, for fresh and
//! reused ids. Every request the web server started gets exactly one
//! `FCGI_END_REQUEST` (its answer, or the acknowledgement of its abort, or
//! OVERLOADED), an aborted request's late completion never displaces a live
//! one's, and the connection stays usable.

mod common;

use bytes::Bytes;
use common::fcgi::{record, request, take_record};
use http::{Request, Response};
use http_body_util::Full;
use proptest::prelude::*;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_exit::serve::fastcgi::RequestBody;
use tower_exit::Supervisor;

/// `/sleep/N` answers "ok" after N microseconds.
async fn app(req: Request<RequestBody>) -> Result<Response<Full<Bytes>>, Infallible> {
    let micros: u64 = req
        .uri()
        .path()
        .strip_prefix("/sleep/")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if micros > 0 {
        tokio::time::sleep(Duration::from_micros(micros)).await;
    }
    Ok(Response::new(Full::from("ok")))
}

async fn server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let supervisor = Supervisor::new();
    let serve = tower_exit::serve::fastcgi(listener, tower::service_fn(app), &supervisor);
    tokio::spawn(async move {
        let _keep = supervisor;
        serve.await
    });
    addr
}

#[derive(Clone, Copy, Debug)]
enum Op {
    /// A whole request (BEGIN with keep-conn, PARAMS, STDIN) sleeping this
    /// many microseconds, if the id is free.
    Start(u16, u16),
    /// ABORT_REQUEST for the id, if it was started and not yet aborted.
    Abort(u16),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        3 => (1u16..=80, 0u16..3000).prop_map(|(id, us)| Op::Start(id, us)),
        2 => (1u16..=80).prop_map(Op::Abort),
    ];
    prop::collection::vec(op, 100..500)
}

/// The bytes the web server sends, and how many END_REQUESTs each id must
/// get: one per request started (an abort ends the id's incarnation; the
/// id may then be reused at once, as nginx does).
fn script(ops: &[Op]) -> (Vec<u8>, HashMap<u16, usize>) {
    let mut bytes = Vec::new();
    let mut busy: HashMap<u16, bool> = HashMap::new();
    let mut expected: HashMap<u16, usize> = HashMap::new();
    for op in ops {
        match *op {
            Op::Start(id, micros) if !busy.get(&id).copied().unwrap_or(false) => {
                bytes.extend(request(id, true, &format!("/sleep/{micros}"), b""));
                busy.insert(id, true);
                *expected.entry(id).or_default() += 1;
            }
            Op::Abort(id) if busy.get(&id).copied().unwrap_or(false) => {
                bytes.extend(record(2, id, b""));
                busy.insert(id, false);
            }
            _ => {}
        }
    }
    (bytes, expected)
}

/// Reads records until `total` END_REQUESTs arrived (or 10 s passed, or the
/// connection closed), then 100 ms more for any extra: END_REQUESTs per id.
async fn count_ends(stream: &mut TcpStream, total: usize) -> HashMap<u16, usize> {
    let mut ends: HashMap<u16, usize> = HashMap::new();
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut settle: Option<tokio::time::Instant> = None;
    loop {
        while let Some(rec) = take_record(&mut buf) {
            if rec.kind == 3 {
                *ends.entry(rec.id).or_default() += 1;
            }
        }
        if settle.is_none() && ends.values().sum::<usize>() >= total {
            settle = Some(tokio::time::Instant::now() + Duration::from_millis(100));
        }
        let until = settle.unwrap_or(deadline);
        let mut chunk = [0u8; 65536];
        match tokio::time::timeout_at(until, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return ends,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_started_request_gets_exactly_one_end_and_the_connection_stays_usable(ops in ops()) {
        let runtime = runtime();
        let (ends, expected, last) = runtime.block_on(async {
            let addr = server().await;
            let (bytes, expected) = script(&ops);
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(&bytes).await.unwrap();
            let total = expected.values().sum();
            let ends = count_ends(&mut stream, total).await;
            // Usable afterwards: a fresh id on the same connection.
            stream.write_all(&request(500, true, "/", b"")).await.unwrap();
            let last = count_ends(&mut stream, 1).await;
            (ends, expected, last)
        });
        prop_assert_eq!(ends, expected);
        prop_assert_eq!(last.get(&500), Some(&1));
    }
}
