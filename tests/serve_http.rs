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
