//! Arbitrary records and bytes thrown at a running FastCGI server: it never
//! panics, closes or answers each such connection, keeps serving every
//! other one, and its memory stays flat.

mod common;

use common::fcgi::{read_until_end, record, request, response_of};
use proptest::prelude::*;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_exit::serve::fastcgi::{Limits, RequestBody};
use tower_exit::Supervisor;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// One server for every case, with small limits so that cases reach them.
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        runtime().block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let supervisor = Supervisor::new();
            let svc = tower::service_fn(|req: http::Request<RequestBody>| async move {
                use http_body_util::BodyExt;
                let _ = req.into_body().collect().await;
                Ok::<_, Infallible>(http::Response::new(String::from("ok")))
            });
            let limits = Limits::default()
                .max_params_bytes(2048)
                .max_body_bytes(4096)
                .max_requests_per_conn(4);
            let serve = tower_exit::serve::fastcgi(listener, svc, &supervisor).limits(limits);
            tokio::spawn(async move {
                let _keep = supervisor;
                serve.await
            });
            addr
        })
    })
}

fn resident_bytes() -> u64 {
    common::resident_kib(std::process::id()) * 1024
}

/// A record of any type for a few request ids, or a well-formed piece of a
/// request (so that cases get past the first record often).
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (0u8..14, 0u16..4, prop::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(kind, id, content)| record(kind, id, &content)),
        (1u16..4, prop::collection::vec(any::<u8>(), 0..5000))
            .prop_map(|(id, body)| request(id, true, "/", &body)),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_input_never_breaks_the_server(pieces in prop::collection::vec(piece(), 0..12)) {
        let addr = server();
        runtime().block_on(async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            for piece in &pieces {
                if stream.write_all(piece).await.is_err() {
                    break; // closed on bad input: fine
                }
            }
            let _ = stream.shutdown().await;
            // The server answers what it can and closes: it never hangs on us.
            let mut sink = [0u8; 65536];
            loop {
                match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut sink)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => continue,
                    Err(_) => panic!("server neither answered nor closed"),
                }
            }
            // And every other connection is still served.
            let mut fresh = TcpStream::connect(addr).await.unwrap();
            fresh.write_all(&request(1, false, "/", b"")).await.unwrap();
            let (stdout, end) = response_of(&read_until_end(&mut fresh, &[1]).await, 1);
            assert!(stdout.starts_with("Status: 200 OK"), "{stdout:?}");
            assert_eq!(end, Some(0));
        });
    }
}

#[test]
fn memory_stays_flat_under_lying_lengths() {
    let addr = server();
    let before = resident_bytes();
    runtime().block_on(async {
        for _ in 0..200 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // A header announcing 65,535 bytes, then silence and close; and
            // params announcing a 2 GiB value.
            let _ = stream.write_all(&[1, 4, 0, 1, 0xff, 0xff, 0xff, 0]).await;
            let _ = stream
                .write_all(&record(1, 1, &[0, 1, 1, 0, 0, 0, 0, 0]))
                .await;
            let _ = stream
                .write_all(&record(
                    4,
                    1,
                    &[0xff, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff],
                ))
                .await;
            drop(stream);
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 32 * 1024 * 1024,
        "resident memory grew by {grown} bytes"
    );
}
