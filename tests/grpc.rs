//! gRPC with tonic: examples/grpc.rs (a tonic service behind
//! `supervisor.stack()`, with the health service) served by tonic's own
//! server through `serve::graceful` and by `serve::http`, called by tonic's
//! client and by grpcio (Python, the C core: another implementation).
//! An exit is `UNAVAILABLE` with its message, a panic `INTERNAL`, an
//! application's `Status` passes untouched; health turns `NOT_SERVING` the
//! moment the drain starts; an open server stream ends, after the grace,
//! with `UNAVAILABLE` in its trailers (not a reset); the process ends with
//! the exit's code.

mod common;
#[path = "../examples/demo/grpc.rs"]
mod service;

use common::demo::{example, free_port, signal, wait_for_port, Proc};
use std::future::IntoFuture;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::codec::Streaming;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::ServiceBuilder;
use tower_exit::{ServiceBuilderExt, Supervisor};

const SERVERS: [&str; 2] = ["tonic", "http"];

/// The message the trailers of a stream ended by the drain carry.
const SHUTTING_DOWN: &str = "the server is shutting down";

fn server(kind: &str, grace: &str, delay: &str) -> (Proc, u16) {
    let port = free_port();
    let mut command = Command::new(example("grpc"));
    command.args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--server",
        kind,
        "--grace",
        grace,
        "--shutdown-delay",
        delay,
    ]);
    let proc = Proc::spawn(command);
    proc.wait_for_line("listening on");
    wait_for_port(port, || format!("{:?}", proc.stderr.lock().unwrap()));
    (proc, port)
}

use service::Codec;

/// What the client reads for `demo.Demo/Restart`: the exit, its message
/// percent-encoded on the wire.
const RESTART: &str = "exit 4: configuration changed: 100% new (é)";

async fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn unary(channel: &Channel, method: &str) -> Result<(), Status> {
    let mut client = tonic::client::Grpc::new(channel.clone());
    client
        .ready()
        .await
        .map_err(|err| Status::unknown(err.to_string()))?;
    let path = format!("/demo.Demo/{method}").parse().unwrap();
    client
        .unary(Request::new(()), path, Codec::default())
        .await
        .map(|_| ())
}

async fn watch(channel: &Channel) -> Streaming<()> {
    let mut client = tonic::client::Grpc::new(channel.clone());
    client.ready().await.unwrap();
    client
        .server_streaming(
            Request::new(()),
            "/demo.Demo/Watch".parse().unwrap(),
            Codec::default(),
        )
        .await
        .unwrap()
        .into_inner()
}

async fn check(channel: &Channel, service: &str) -> Result<ServingStatus, Status> {
    let res = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(res.into_inner().status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_client_exit_is_unavailable_panic_internal_health_drains_streams_end_with_14() {
    for kind in SERVERS {
        let (mut proc, port) = server(kind, "2", "0");
        let channel = channel(port).await;

        assert!(unary(&channel, "Hello").await.is_ok(), "{kind}");
        let failed = unary(&channel, "Fail").await.unwrap_err();
        assert_eq!(
            (failed.code(), failed.message()),
            (
                Code::FailedPrecondition,
                "not now: the ledger is closed (é)"
            ),
            "{kind}: an application's status passes untouched"
        );
        let panicked = unary(&channel, "Panic").await.unwrap_err();
        assert_eq!(
            (panicked.code(), panicked.message()),
            (Code::Internal, "Internal Server Error"),
            "{kind}: {panicked:?}"
        );
        assert_eq!(check(&channel, "").await.unwrap(), ServingStatus::Serving);
        assert_eq!(
            check(&channel, "demo.Demo").await.unwrap(),
            ServingStatus::Serving
        );
        assert_eq!(
            check(&channel, "nope").await.unwrap_err().code(),
            Code::NotFound
        );

        let mut stream = watch(&channel).await;
        stream.message().await.unwrap().expect("a first message");
        let mut health = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: "demo.Demo".to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            health.message().await.unwrap().unwrap().status(),
            ServingStatus::Serving
        );

        let exit_at = Instant::now();
        let exited = unary(&channel, "Exit").await.unwrap_err();
        assert_eq!(
            (exited.code(), exited.message()),
            (Code::Unavailable, "exit 3"),
            "{kind}: {exited:?}"
        );
        let turned = tokio::time::timeout(Duration::from_secs(1), health.message())
            .await
            .expect("NOT_SERVING at once")
            .unwrap()
            .unwrap();
        assert_eq!(turned.status(), ServingStatus::NotServing, "{kind}");

        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("the stream ends after the grace")
            {
                Ok(Some(())) => continue,
                Ok(None) => panic!("{kind}: the stream ended with OK"),
                Err(status) => break status,
            }
        };
        let after = exit_at.elapsed();
        assert_eq!(
            (ended.code(), ended.message()),
            (Code::Unavailable, SHUTTING_DOWN),
            "{kind}: the stream ends with trailers, not a reset: {ended:?}"
        );
        assert!(
            after >= Duration::from_millis(1700) && after <= Duration::from_millis(2100),
            "{kind}: ended {after:?} after the exit (grace 2 s, last call at 1.8 s)"
        );
        let status = proc.wait_exit(Duration::from_secs(5));
        assert_eq!(status.code(), Some(3), "{kind}");
    }
}

/// A call sent again once if it was never processed: a connection that got
/// GOAWAY (`serve::http` sends it when the shutdown delay starts, so that
/// clients reconnect) cancels a request that raced it, before it went out
/// (tonic's `Channel` says `CANCELLED`), or refuses it as the GOAWAY said
/// (h2's error `GoAway(NO_ERROR, Remote)`: a stream the server will not
/// process, surfaced as `INTERNAL`); tonic reconnects and leaves the retry
/// to the caller (grpcio retries such calls by itself, "transparent
/// retry").
async fn again_if_unsent<T, F: std::future::Future<Output = Result<T, Status>>>(
    call: impl Fn() -> F,
) -> Result<T, Status> {
    match call().await {
        Err(status) if unsent(&status) => call().await,
        other => other,
    }
}

fn unsent(status: &Status) -> bool {
    let cancelled = status.code() == Code::Cancelled;
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if cancelled
            && err
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        if err.downcast_ref::<h2::Error>().is_some_and(|err| {
            err.is_go_away() && err.is_remote() && err.reason() == Some(h2::Reason::NO_ERROR)
        }) {
            return true;
        }
        source = err.source();
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_through_the_shutdown_delay_while_calls_succeed() {
    for kind in SERVERS {
        let (mut proc, port) = server(kind, "2", "2");
        let channel = channel(port).await;
        assert_eq!(check(&channel, "").await.unwrap(), ServingStatus::Serving);
        signal(proc.pid(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_millis(500);
        let during = loop {
            let status = again_if_unsent(|| check(&channel, "")).await.unwrap();
            if status != ServingStatus::Serving || Instant::now() > deadline {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(during, ServingStatus::NotServing, "{kind}");
        assert_eq!(
            again_if_unsent(|| check(&channel, "demo.Demo"))
                .await
                .unwrap(),
            ServingStatus::NotServing,
            "{kind}"
        );
        let hello = again_if_unsent(|| unary(&channel, "Hello")).await;
        assert!(hello.is_ok(), "{kind}: still serving: {hello:?}");
        let status = proc.wait_exit(Duration::from_secs(8));
        assert_eq!(status.code(), Some(0), "{kind}");
    }
}

fn grpcio(args: &[&str]) -> Command {
    let mut command = Command::new("python3");
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/grpc_client.py"
        ))
        .args(args);
    command
}

#[test]
fn grpcio_client_sees_unavailable_internal_untouched_statuses_and_not_serving() {
    for kind in SERVERS {
        let (mut proc, port) = server(kind, "2", "0");
        let out = grpcio(&["exit", &format!("127.0.0.1:{port}")])
            .stderr(Stdio::inherit())
            .output()
            .expect("python3");
        assert!(out.status.success(), "{kind}: grpc_client.py failed");
        let result: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("one JSON object");
        let call = |name: &str| {
            (
                result[name]["code"].as_str().unwrap().to_owned(),
                result[name]["details"].as_str().map(str::to_owned),
            )
        };
        assert_eq!(call("hello"), ("OK".to_owned(), None), "{kind}");
        assert_eq!(
            call("fail"),
            (
                "FAILED_PRECONDITION".to_owned(),
                Some("not now: the ledger is closed (é)".to_owned())
            ),
            "{kind}"
        );
        assert_eq!(call("panic").0, "INTERNAL", "{kind}: {result}");
        assert_eq!(
            call("exit"),
            ("UNAVAILABLE".to_owned(), Some("exit 3".to_owned())),
            "{kind}: {result}"
        );
        assert_eq!(result["health"], "SERVING");
        assert_eq!(result["health_demo"], "SERVING");
        let seen = result["health_watch"]["seen"].as_array().unwrap();
        let statuses: Vec<&str> = seen.iter().map(|s| s[0].as_str().unwrap()).collect();
        assert_eq!(statuses, ["SERVING", "NOT_SERVING"], "{kind}: {result}");
        let turned_after = seen[1][1].as_f64().unwrap();
        assert!(
            turned_after < 1.0,
            "{kind}: NOT_SERVING after {turned_after} s"
        );
        let watch = &result["watch"];
        assert_eq!(
            (watch["code"].as_str(), watch["details"].as_str()),
            (Some("UNAVAILABLE"), Some(SHUTTING_DOWN)),
            "{kind}: the stream ends with trailers: {result}"
        );
        let ended_after = watch["ended_after"].as_f64().unwrap();
        assert!(
            (1.7..2.1).contains(&ended_after),
            "{kind}: ended {ended_after} s after the exit (grace 2 s, last call at 1.8 s)"
        );
        assert_eq!(proc.wait_exit(Duration::from_secs(5)).code(), Some(3));
    }
}

/// In process: `demo.Demo` under each exit-aware arrangement a tonic user
/// may pick, served by `serve::http` (grace 1 s); and with none at all
/// (the server answers an exit that reaches it, and ends the stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_boundary_the_stack_and_the_server_answer_in_grpc_form() {
    for arrangement in ["boundary + catch_panic", "stack", "server only"] {
        let supervisor = Supervisor::new();
        let routes = tonic::service::Routes::new(service::Demo);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let grace = Duration::from_secs(1);
        let server = match arrangement {
            "boundary + catch_panic" => {
                let app = ServiceBuilder::new()
                    .boundary(&supervisor)
                    .catch_panic()
                    .service(routes);
                let server = tower_exit::serve::http(listener, app, &supervisor);
                tokio::spawn(server.grace(grace).into_future())
            }
            "stack" => {
                let app = ServiceBuilder::new()
                    .layer(supervisor.stack())
                    .service(routes);
                let server = tower_exit::serve::http(listener, app, &supervisor);
                tokio::spawn(server.grace(grace).into_future())
            }
            _ => {
                let server = tower_exit::serve::http(listener, routes, &supervisor);
                tokio::spawn(server.grace(grace).into_future())
            }
        };
        let channel = channel(port).await;
        assert!(unary(&channel, "Hello").await.is_ok(), "{arrangement}");
        if arrangement != "server only" {
            let panicked = unary(&channel, "Panic").await.unwrap_err();
            assert_eq!(
                (panicked.code(), panicked.message()),
                (Code::Internal, "Internal Server Error"),
                "{arrangement}"
            );
        }
        let mut stream = watch(&channel).await;
        stream.message().await.unwrap().expect("a first message");
        let exited = unary(&channel, "Restart").await.unwrap_err();
        assert_eq!(
            (exited.code(), exited.message()),
            (Code::Unavailable, RESTART),
            "{arrangement}"
        );
        let ended = loop {
            match stream.message().await {
                Ok(Some(())) => continue,
                Ok(None) => panic!("{arrangement}: the stream ended with OK"),
                Err(status) => break status,
            }
        };
        assert_eq!(
            (ended.code(), ended.message()),
            (Code::Unavailable, SHUTTING_DOWN),
            "{arrangement}: {ended:?}"
        );
        let exit = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server drains")
            .unwrap()
            .unwrap();
        assert_eq!(exit.code(), 4, "{arrangement}");
    }
}

/// `trace::grpc_layer()` outside the stack under tonic's own server: the
/// exit's `UNAVAILABLE` completes as a success, the panic's `INTERNAL` and
/// the application's status are failures.
#[tokio::test(flavor = "current_thread")]
async fn the_grpc_trace_layer_does_not_count_an_exit_as_a_failure() {
    let (logs, _guard) = common::logs::capture();
    let supervisor = Supervisor::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let layers = ServiceBuilder::new()
        .layer(tower_exit::trace::grpc_layer())
        .layer(supervisor.stack());
    let server = tokio::spawn(
        tower_exit::serve::graceful(&supervisor, |shutdown| {
            tonic::transport::Server::builder()
                .layer(layers)
                .add_service(service::Demo)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    shutdown,
                )
        })
        .grace(Duration::from_secs(5))
        .into_future(),
    );
    let channel = channel(port).await;
    assert!(unary(&channel, "Hello").await.is_ok());
    assert_eq!(
        unary(&channel, "Fail").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        unary(&channel, "Panic").await.unwrap_err().code(),
        Code::Internal
    );
    assert_eq!(
        unary(&channel, "Restart").await.unwrap_err().code(),
        Code::Unavailable
    );
    drop(channel);
    assert_eq!(server.await.unwrap().unwrap().code(), 4);

    let failures = logs.with_message("response failed");
    let classes: Vec<_> = failures
        .iter()
        .filter_map(|e| e.get("classification"))
        .collect();
    assert_eq!(
        logs.with_message("finished processing request").len(),
        4,
        "every call completes"
    );
    // Fail and Panic are failures; the exit's UNAVAILABLE (Restart) is not.
    assert_eq!(classes.len(), 2, "{classes:?}");
    assert!(classes[0].contains("FailedPrecondition"), "{classes:?}");
    assert!(classes[1].contains("Internal"), "{classes:?}");
}
